//! `matrix-edge check`: the shipped example configs pass, and each kind of
//! mistake is named with its file, line, column and key, with exit code 1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::certs::TestPki;

fn check(config: &Path) -> (i32, String, String) {
    let output = Command::new(support::binary()).arg("check").arg("-c").arg(config).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The repository's conf/ copied next to generated certificates.
fn conf_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    for entry in std::fs::read_dir(&conf).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let names: [&[&str]; 5] = [
        &["example.com"],
        &["synapse.example.com"],
        &["element.example.com"],
        &["auth.example.com"],
        &["rtc.example.com"],
    ];
    TestPki::new(&names).copy_into(&dir.path().join("certs"));
    // The static root conf/full-stack.yaml serves (Element Web's files).
    std::fs::create_dir_all(dir.path().join("element-web")).unwrap();
    std::fs::write(dir.path().join("element-web/index.html"), "<!doctype html>").unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

#[test]
fn every_example_config_passes_check() {
    let (_dir, path) = conf_copy();
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&path).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_some_and(|e| e == "yaml") {
            let (code, stdout, stderr) = check(&file);
            assert_eq!(code, 0, "{} failed: {stderr}", file.display());
            assert_eq!(stdout.lines().count(), 1, "{stdout}");
            assert!(stdout.contains(" ok: server_name example.com"), "{stdout}");
            checked.push(file.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "acme.yaml",
            "behind-load-balancer.yaml",
            "classic.yaml",
            "delegation.yaml",
            "full-stack.yaml",
            "workers.yaml"
        ]
    );
}

/// Applies `edit` to conf/delegation.yaml and returns check's verdict.
fn check_edited(edit: impl Fn(&str) -> String) -> (i32, String) {
    check_conf_edited("delegation.yaml", edit)
}

/// Applies `edit` to one of conf/'s files and returns check's exit code and stderr.
fn check_conf_edited(name: &str, edit: impl Fn(&str) -> String) -> (i32, String) {
    let (_dir, path) = conf_copy();
    let original = std::fs::read_to_string(path.join(name)).unwrap();
    let edited = edit(&original);
    assert_ne!(edited, original, "the edit changed nothing");
    let file = path.join("edited.yaml");
    std::fs::write(&file, edited).unwrap();
    let (code, stdout, stderr) = check(&file);
    assert!(stdout.is_empty(), "{stdout}");
    (code, stderr)
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn unknown_key_is_named_with_line_and_column() {
    let (code, stderr) = check_edited(|t| t.replace("  allow: [", "  alow: ["));
    assert_eq!(code, 1);
    assert!(stderr.contains("edited.yaml:"), "{stderr}");
    assert!(stderr.contains("admin_api: unknown field `alow`, expected `allow`"), "{stderr}");
}

#[test]
fn bad_listen_address_is_named() {
    let (code, stderr) = check_edited(|t| t.replace("[::]:443", "[::]:4430000"));
    assert_eq!(code, 1);
    assert!(stderr.contains(":8:"), "{stderr}");
    assert!(stderr.contains("listeners[0]") && stderr.contains("invalid listen address \"[::]:4430000\""), "{stderr}");
}

#[test]
fn unreadable_certificate_is_named_with_its_key() {
    let (code, stderr) = check_edited(|t| t.replace("certs/example.com/fullchain.pem", "certs/missing/fullchain.pem"));
    assert_eq!(code, 1);
    let line = line_of(include_str!("../../conf/delegation.yaml"), "certs/example.com/fullchain.pem");
    assert!(stderr.contains(&format!("edited.yaml:{line}:")), "{stderr}");
    assert!(stderr.contains("tls.certificates[1].cert: cannot read certificate file"), "{stderr}");
    assert!(stderr.contains("missing/fullchain.pem"), "{stderr}");
}

#[test]
fn key_that_does_not_match_its_certificate_is_refused() {
    let (code, stderr) =
        check_edited(|t| t.replace("certs/example.com/privkey.pem", "certs/synapse.example.com/privkey.pem"));
    assert_eq!(code, 1);
    assert!(stderr.contains("tls.certificates[1].key: private key"), "{stderr}");
    assert!(stderr.contains("does not match the certificate"), "{stderr}");
}

#[test]
fn a_file_that_is_not_pem_is_refused() {
    let (_dir, path) = conf_copy();
    std::fs::write(path.join("certs/example.com/fullchain.pem"), "not a certificate").unwrap();
    let (code, _, stderr) = check(&path.join("delegation.yaml"));
    assert_eq!(code, 1);
    assert!(stderr.contains("holds no PEM certificate"), "{stderr}");
}

#[test]
fn m_server_without_a_federation_listener_is_refused() {
    let (code, stderr) =
        check_edited(|t| t.replace("serves: [well_known, client, federation]", "serves: [well_known, client]"));
    assert_eq!(code, 1);
    let line = line_of(include_str!("../../conf/delegation.yaml"), "  server: synapse.example.com:443");
    assert!(stderr.contains(&format!(":{line}:3: well_known.server: m.server")), "{stderr}");
    assert!(stderr.contains("no listener serves federation"), "{stderr}");
}

#[test]
fn bad_well_known_values_are_refused() {
    let (code, stderr) =
        check_edited(|t| t.replace("homeserver: https://synapse.example.com", "homeserver: synapse.example.com"));
    assert_eq!(code, 1);
    assert!(stderr.contains("well_known.client.homeserver: invalid URL"), "{stderr}");
    let (code, stderr) =
        check_edited(|t| t.replace("server: synapse.example.com:443", "server: https://synapse.example.com"));
    assert_eq!(code, 1);
    assert!(stderr.contains("well_known.server: invalid server address"), "{stderr}");
    let (code, stderr) = check_edited(|t| t.replace("role: m.role.admin", "role: admin"));
    assert_eq!(code, 1);
    assert!(stderr.contains("well_known.support.contacts[0]: role \"admin\""), "{stderr}");
}

#[test]
fn tls_listener_without_certificates_is_refused() {
    let (code, stderr) = check_edited(|t| {
        let start = t.find("tls:\n  certificates:").unwrap();
        let end = t.find("well_known:").unwrap();
        format!("{}{}", &t[..start], &t[end..])
    });
    assert_eq!(code, 1);
    assert!(stderr.contains("listeners[0].tls: this listener uses TLS but there is no certificate"), "{stderr}");
}

#[test]
fn acme_mistakes_are_located() {
    type Edit<'a> = &'a dyn Fn(&str) -> String;
    let cases: [(Edit, &str); 7] = [
        (
            &|t| t.replace("contact: admin@example.com", "contact: admin"),
            "tls.acme.contact: \"admin\" is not an email address",
        ),
        (
            &|t| t.replace("directory: letsencrypt", "directory: http://ca.example/dir"),
            "tls.acme.directory: \"http://ca.example/dir\": use letsencrypt",
        ),
        (
            &|t| t.replace("    state_dir:", "    names: [\"*.example.com\"]\n    state_dir:"),
            "tls.acme.names[0]: *.example.com: wildcard certificates need DNS-01",
        ),
        (
            &|t| t.replace("  - { address: \"[::]:80\", serves: [acme, redirect] }\n", ""),
            "tls.acme: HTTP-01 needs a plain-HTTP listener",
        ),
        (
            &|t| {
                t.replace("serves: [well_known, client, federation]", "serves: [well_known, client, federation, acme]")
            },
            "listeners[0].serves: `acme` is for a plain-HTTP listener",
        ),
        (
            &|t| t.replace("serves: [acme, redirect]", "serves: [acme, redirect, client]"),
            "`redirect` answers every path",
        ),
        (
            &|t| t.replace("    state_dir:", "    ca_file: certs/missing.pem\n    state_dir:"),
            "tls.acme.ca_file: cannot read",
        ),
    ];
    for (edit, expected) in cases {
        let (code, stderr) = check_conf_edited("acme.yaml", edit);
        assert_eq!(code, 1, "{expected}: {stderr}");
        assert!(stderr.contains(expected), "expected {expected:?} in {stderr}");
        assert!(stderr.contains("edited.yaml:"), "{stderr}");
    }
}

#[test]
fn bad_sizes_durations_and_networks_are_refused() {
    let (code, stderr) = check_edited(|t| t.replace("max_upload_size: 50M", "max_upload_size: 50Q"));
    assert_eq!((code, stderr.contains("invalid size \"50Q\"")), (1, true), "{stderr}");
    let (code, stderr) = check_edited(|t| t.replace("max_age: 1h", "max_age: soon"));
    assert_eq!((code, stderr.contains("invalid duration \"soon\"")), (1, true), "{stderr}");
    let (code, stderr) = check_edited(|t| t.replace("127.0.0.1/32", "127.0.0.1/33"));
    assert_eq!((code, stderr.contains("invalid network \"127.0.0.1/33\"")), (1, true), "{stderr}");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let (code, _, stderr) = check(Path::new("/nonexistent/matrix-edge.yaml"));
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/matrix-edge.yaml: cannot read the config file"), "{stderr}");
}

#[test]
fn synapse_rejections_are_explained() {
    let (code, stderr) = check_edited(|t| {
        t.replace(
            "synapse:\n  main: 127.0.0.1:8008",
            "synapse:\n  main: 127.0.0.1:8008\n  stream_writers:\n    typing: [127.0.0.1:9001, 127.0.0.1:9002]",
        )
    });
    assert_eq!(code, 1);
    assert!(
        stderr.contains("synapse.stream_writers.typing: Synapse allows exactly one typing stream writer"),
        "{stderr}"
    );
    let (code, stderr) = check_edited(|t| {
        t.replace(
            "synapse:\n  main: 127.0.0.1:8008",
            "synapse:\n  main: 127.0.0.1:8008\n  workers:\n    sso: [127.0.0.1:9001, 127.0.0.1:9002]",
        )
    });
    assert_eq!(code, 1);
    assert!(stderr.contains("synapse.workers.sso: every step of an SSO login must reach the same process"), "{stderr}");
    let (code, stderr) = check_edited(|t| {
        t.replace(
            "synapse:\n  main: 127.0.0.1:8008",
            "synapse:\n  main: 127.0.0.1:8008\n  routes:\n    - { path: \"^/x\", to: synchrotron }",
        )
    });
    assert_eq!(code, 1);
    assert!(stderr.contains("synapse.routes[0].to: no synchrotron workers are declared"), "{stderr}");
}

#[test]
fn routes_and_route_explain_the_table() {
    let (_dir, path) = conf_copy();
    let config = path.join("workers.yaml");
    let output = Command::new(support::binary()).arg("routes").arg("-c").arg(&config).output().unwrap();
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.lines().count() > 100, "{table}");
    assert!(table.contains("^/_matrix/client/(r0|v3)/sync$") && table.contains("synchrotron"), "{table}");
    assert!(table.contains("(config)"), "user rules are marked: {table}");
    assert!(table.starts_with("# Synapse's own routing, as of Synapse 1.163"), "{table}");
    assert!(table.contains("simplified_msc3575/sync$"), "{table}");
    assert!(table.contains("(skipped: no mas)"), "MAS's rule without MAS: {table}");
    // Each pool's policy, with the example's override for client readers.
    assert!(
        table.contains(
            "group client_reader: 1 members; least outstanding, at most 100 in flight per member, 200 waiting up to 5s"
        ),
        "{table}"
    );
    assert!(
        table.contains("group synchrotron: 2 members; least outstanding, no cap, ejected after 3 failures for 10s"),
        "{table}"
    );
    let explain = |method: &str, target: &str, headers: &[&str]| {
        let mut command = Command::new(support::binary());
        command.arg("route").arg("-c").arg(&config).arg(method).arg(target);
        for header in headers {
            command.arg("-H").arg(header);
        }
        let output = command.output().unwrap();
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let sync = explain("GET", "/_matrix/client/v3/sync?since=s1", &["Authorization: Bearer syt_YWxpY2U_a_b"]);
    assert!(sync.contains("group synchrotron (2 workers), sticky by user: key \"YWxpY2U\""), "{sync}");
    assert!(sync.contains("balancing: least outstanding, no cap"), "{sync}");
    let initial = explain("GET", "/_matrix/client/v3/sync", &[]);
    assert!(initial.contains("group initial_sync"), "{initial}");
    let media = explain("GET", "/_matrix/media/v3/download/a/b", &[]);
    assert!(media.contains("none: waits for a worker up to synapse.hold, then 503"), "{media}");
    let refused = explain("GET", "/_synapse/replication/x", &[]);
    assert!(refused.contains("refused by the edge: 404 M_UNRECOGNIZED"), "{refused}");
    let unclaimed = explain("POST", "/_matrix/client/v3/logout", &[]);
    assert!(unclaimed.contains("no rule matches: the main process serves it"), "{unclaimed}");
}

#[test]
fn mistakes_in_sites_and_upstreams_are_located() {
    let text = include_str!("../../conf/full-stack.yaml");
    let cases: [(&str, &str, &str, &str); 7] = [
        (
            "{ path: /sfu/get, upstream: lk-jwt }",
            "{ path: /sfu/get, upstream: lk-jtw }",
            "sites[2].routes[0].upstream: no upstream named \"lk-jtw\"",
            "{ path: /sfu/get, upstream: lk-jwt }",
        ),
        (
            "hosts: [auth.example.com]",
            "hosts: [element.example.com]",
            "element.example.com is already answered by sites[0]",
            "hosts: [auth.example.com]",
        ),
        (
            "root: element-web",
            "root: no-such-dir",
            "sites[0].routes[0].static.root: cannot open static root",
            "root: element-web",
        ),
        (
            "{ path: /healthz, upstream: lk-jwt }",
            "{ path: /healthz, upstream: lk-jwt, websocket_idle_timeout: soon }",
            "invalid duration \"soon\"",
            "{ path: /healthz, upstream: lk-jwt }",
        ),
        (
            "{ path: /, redirect: { to: \"https://element.example.com\", status: 301 } }",
            "{ path: /_matrix/client, redirect: { to: \"https://element.example.com\", status: 301 } }",
            "matrix_site.routes[0].path: /_matrix/client is a Matrix path",
            "{ path: /, redirect:",
        ),
        (
            "{ path: /metrics, upstream: mas, allow: [127.0.0.1/32] }",
            "{ path: /metrics, upstream: mas, allow: [127.0.0.1/33] }",
            "invalid",
            "{ path: /metrics, upstream: mas",
        ),
        (
            "livekit: { address: 127.0.0.1:7880 }",
            "livekit: { adress: 127.0.0.1:7880 }",
            "unknown field `adress`",
            "livekit: { address: 127.0.0.1:7880 }",
        ),
    ];
    for (from, to, message, located_at) in cases {
        let (code, stderr) = check_conf_edited("full-stack.yaml", |t| t.replace(from, to));
        assert_eq!(code, 1, "{to}: {stderr}");
        assert!(stderr.contains(message), "{to}: {stderr}");
        let line = line_of(text, located_at);
        assert!(stderr.contains(&format!("edited.yaml:{line}:")), "{to}: expected line {line}: {stderr}");
    }
}

#[test]
fn route_shows_the_site_choice() {
    let (_dir, path) = conf_copy();
    let config = path.join("full-stack.yaml");
    let route = |args: &[&str]| {
        let output = Command::new(support::binary()).arg("route").arg("-c").arg(&config).args(args).output().unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    let rtc = route(&["GET", "/rtc?access_token=x", "-H", "Host: rtc.example.com"]);
    assert!(rtc.contains("site: sites[2] rtc.example.com (host rtc.example.com)"), "{rtc}");
    assert!(rtc.contains("-> upstream livekit [127.0.0.1:7880] as /rtc?access_token=x"), "{rtc}");
    assert!(rtc.contains("WebSocket upgrades allowed, closed after 120s idle"), "{rtc}");
    let admin = route(&["GET", "/api/admin/v1/users", "-H", "Host: auth.example.com"]);
    assert!(
        admin.contains("route sites[1].routes[1]: prefix /api/admin")
            && admin.contains("only from: 10.0.0.0/8, 127.0.0.1/32"),
        "{admin}"
    );
    let sync = route(&["GET", "/_matrix/client/v3/sync", "-H", "Host: synapse.example.com"]);
    assert!(sync.contains("site: the Matrix site (host synapse.example.com)") && sync.contains("-> main"), "{sync}");
    let landing = route(&["GET", "/", "-H", "Host: example.com"]);
    assert!(landing.contains("answered by the edge: 301 to https://element.example.com/"), "{landing}");
    let unknown = route(&["GET", "/", "-H", "Host: nobody.example.org"]);
    assert!(unknown.contains("refused by the edge: 421"), "{unknown}");
}

#[test]
fn discovered_workers_are_checked_without_dns() {
    // A discover name is accepted by check without any lookup.
    let (_dir, path) = conf_copy();
    let text = std::fs::read_to_string(path.join("workers.yaml")).unwrap().replace(
        "synchrotron: [127.0.0.1:8083, 127.0.0.1:8084]",
        "synchrotron: [{ discover: \"_synapse-http._tcp.sync.invalid\" }]",
    );
    std::fs::write(path.join("discovered.yaml"), text).unwrap();
    let (code, _, stderr) = check(&path.join("discovered.yaml"));
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = check_conf_edited("workers.yaml", |t| {
        t.replace("synchrotron: [127.0.0.1:8083, 127.0.0.1:8084]", "synchrotron: [{ discover: \"sync.invalid\" }]")
    });
    assert_eq!(code, 1);
    assert!(stderr.contains("edited.yaml:") && stderr.contains("synchrotron"), "{stderr}");
    let (code, stderr) = check_conf_edited("workers.yaml", |t| {
        t.replace("typing: 127.0.0.1:8092", "typing: { discover: \"typing.internal:8092\" }")
    });
    assert_eq!(code, 1);
    assert!(stderr.contains("stream_writers.typing: typing must be one known process"), "{stderr}");
}

#[test]
fn check_cross_checks_against_synapses_config() {
    let (_dir, path) = conf_copy();
    let check_with = |config: &str, homeserver: &str, workers: Option<&Path>| {
        std::fs::write(path.join("homeserver.yaml"), homeserver).unwrap();
        let mut command = Command::new(support::binary());
        command.arg("check").arg("-c").arg(path.join(config)).arg("--synapse").arg(path.join("homeserver.yaml"));
        if let Some(dir) = workers {
            command.arg("--workers").arg(dir);
        }
        let output = command.output().unwrap();
        (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    // Agreeing configs: delegation.yaml and a Synapse that matches it.
    let agreeing = "server_name: example.com\npublic_baseurl: https://synapse.example.com/\nmax_upload_size: 50M\nlisteners:\n  - {port: 8008, bind_addresses: ['127.0.0.1'], type: http, x_forwarded: true, resources: [{names: [client, federation]}]}\n";
    let (code, stderr) = check_with("delegation.yaml", agreeing, None);
    assert_eq!(code, 0, "{stderr}");
    // Synapse not reading the edge's request IDs: a warning, not a failure.
    assert!(stderr.contains("has no request_id_header: add `request_id_header: x-request-id`"), "{stderr}");
    let reading = agreeing.replace("x_forwarded: true,", "x_forwarded: true, request_id_header: X-Request-ID,");
    let (code, stderr) = check_with("delegation.yaml", &reading, None);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("request_id_header"), "{stderr}");
    // Each disagreement named.
    let disagreeing = "server_name: example.com\npublic_baseurl: https://matrix.example.com/\nmax_upload_size: 100M\nserve_server_wellknown: true\nlisteners:\n  - {port: 8008, type: http, resources: [{names: [client]}]}\nstream_writers: {typing: [typing1]}\n";
    let (code, stderr) = check_with("delegation.yaml", disagreeing, None);
    assert_eq!(code, 1);
    for expected in [
        "x_forwarded off",
        "uploads between 52428800 and 104857600 bytes",
        "Synapse's public_baseurl is https://matrix.example.com",
        "publish /.well-known/matrix/server: keep one",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in {stderr}");
    }
    // Workers: a stream writer the edge routes elsewhere, a worker nobody routes to.
    let workers = path.join("workers");
    std::fs::create_dir_all(&workers).unwrap();
    let worker = |name: &str, port: u16| {
        format!("worker_app: synapse.app.generic_worker\nworker_name: {name}\nworker_listeners:\n  - {{port: {port}, bind_addresses: ['127.0.0.1'], type: http, x_forwarded: true, resources: [{{names: [client]}}]}}\n")
    };
    std::fs::write(workers.join("typing1.yaml"), worker("typing1", 8192)).unwrap();
    std::fs::write(workers.join("background1.yaml"), worker("background1", 8199)).unwrap();
    let with_writer = agreeing.to_string() + "stream_writers: {typing: [typing1]}\n";
    let (code, stderr) = check_with("workers.yaml", &with_writer, Some(&workers));
    assert_eq!(code, 1);
    assert!(stderr.contains("Synapse's typing stream writer is typing1 ([\"127.0.0.1:8192\"]), but the edge sends typing requests to [\"127.0.0.1:8092\"]"), "{stderr}");
    assert!(stderr.contains("worker background1 (synapse.app.generic_worker) listens on 127.0.0.1:8199, which no group of the edge's config names"), "{stderr}");
    assert!(stderr.contains("but Synapse has no to_device stream writer"), "{stderr}");
}

/// Deep keys keep their whole path and their own line in check's error,
/// whichever part of the edge finds the mistake (the YAML schema, a worker
/// list, the listeners, the sites or the limits).
#[test]
fn errors_at_deep_keys_name_their_path_and_line() {
    let base = r#"server_name: example.com
listeners:
  - { address: "127.0.0.1:18001", tls: false, serves: [client, sites] }
  - { address: "127.0.0.1:18002", tls: false, serves: [client] }
upstreams:
  web: { members: ["127.0.0.1:18003"] }
synapse:
  main: "127.0.0.1:18004"
  workers:
    synchrotron:
      - "127.0.0.1:18005"
      - { address: "127.0.0.1:18006", weight: 2 }
  stream_writers:
    typing: ["127.0.0.1:18007"]
  balancing:
    max_in_flight: 50
    groups:
      synchrotron: { slow_start: 5s }
sites:
  - hosts: [a.example.com]
    routes:
      - { prefix: /, upstream: web }
      - { prefix: /x/, upstream: web }
rate_limits:
  login: { requests: 5, per: 1m }
federation: { per_origin: { max_in_flight: 8, weights: { backfill: 4 } } }
cluster: { redis: "redis://127.0.0.1:6379/0", name: edge1 }
"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deep.yaml");
    std::fs::write(&file, base).unwrap();
    let (code, _, stderr) = check(&file);
    assert_eq!(code, 0, "the base config must pass: {stderr}");
    let cases: [(&str, &str, &str, &str); 17] = [
        ("weight: 2", "wieght: 2", "synapse.workers.synchrotron[1]", "unknown field `wieght`"),
        ("weight: 2", "weight: -2", "synapse.workers.synchrotron[1].weight", "invalid type"),
        (
            "typing: [\"127.0.0.1:18007\"]",
            "typing: [\"127.0.0.1:18007\", { address: 5 }]",
            "synapse.stream_writers.typing[1].address",
            "invalid upstream",
        ),
        (
            "{ prefix: /x/, upstream: web }",
            "{ prefix: /x/, upstream: nope }",
            "sites[0].routes[1].upstream",
            "no upstream named",
        ),
        ("serves: [client] }", "serves: [client, client] }", "listeners[1].serves", "a role is listed twice"),
        ("per: 1m", "per: 0s", "rate_limits.login.per", "must be between 1s and 24h"),
        ("synchrotron:", "synchrotrn:", "synapse.workers", "unknown field `synchrotrn`"),
        ("max_in_flight: 50", "max_in_flight: 0", "synapse.balancing.max_in_flight", "must be at least 1"),
        (
            "synchrotron: { slow_start: 5s }",
            "synchrotron: { queue: { size: 0, timeout: 1s } }",
            "synapse.balancing.groups.synchrotron.queue",
            "size must be at least 1",
        ),
        (
            "synchrotron: { slow_start: 5s }",
            "client_reader: { slow_start: 5s }",
            "synapse.balancing.groups.client_reader",
            "no client_reader workers are listed",
        ),
        (
            "web: { members: [\"127.0.0.1:18003\"] }",
            "web: { members: [\"127.0.0.1:18003\"], balancing: { queue: { size: 4, timeout: 1s } } }",
            "upstreams.web.balancing.queue",
            "a queue needs max_in_flight",
        ),
        ("backfill: 4", "backfil: 4", "federation.per_origin.weights", "backfil: 4: weigh one of send, backfill"),
        ("backfill: 4", "backfill: 0", "federation.per_origin.weights", "backfill: 0: weigh one of"),
        ("max_in_flight: 8,", "max_in_flight: 0,", "federation.per_origin.max_in_flight", "0 would let no origin in"),
        ("name: edge1", "name: \"edge one\"", "cluster.name", "1 to 64 visible ASCII characters"),
        (
            "redis: \"redis://127.0.0.1:6379/0\"",
            "redis: \"rediss://127.0.0.1:6379/0\"",
            "cluster.redis",
            "TLS to Redis (rediss://) is not built in",
        ),
        (
            "  login: { requests: 5, per: 1m }",
            "  shared: { redis: \"redis://127.0.0.1:6379/1\" }",
            "rate_limits.shared",
            "cluster.redis replaces rate_limits.shared",
        ),
    ];
    for (from, to, key, message) in cases {
        let edited = base.replacen(from, to, 1);
        std::fs::write(&file, &edited).unwrap();
        let (code, _, stderr) = check(&file);
        assert_eq!(code, 1, "{to}: {stderr}");
        let line = line_of(&edited, to);
        let located = format!("deep.yaml:{line}:");
        assert!(
            stderr.contains(&located) && stderr.contains(&format!(": {key}: {message}")),
            "{to}: want {located} … {key}: {message}, got {stderr}"
        );
    }
}

/// Applies `edit` to conf/delegation.yaml; check must pass: its warnings.
fn passing_edit(edit: impl Fn(&str) -> String) -> (i32, String) {
    let (_dir, path) = conf_copy();
    let original = std::fs::read_to_string(path.join("delegation.yaml")).unwrap();
    let edited = edit(&original);
    assert_ne!(edited, original, "the edit changed nothing");
    let file = path.join("edited.yaml");
    std::fs::write(&file, edited).unwrap();
    let (code, stdout, stderr) = check(&file);
    assert!(stdout.contains(" ok: "), "{stdout}{stderr}");
    (code, stderr)
}

/// Without `m.server`, other servers try the server name's port 8448: check
/// warns (and passes) when no listener serves federation there, and stays
/// quiet when either the delegation or a listener on 8448 makes it right.
#[test]
fn check_warns_when_federation_is_unreachable_by_discovery() {
    let warning = "no listener serves federation on port 8448 and well_known.server is not set";
    let undelegated = |t: &str| t.replace("  server: synapse.example.com:443\n", "");
    let (code, stderr) = passing_edit(undelegated);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(warning), "{stderr}");
    assert!(
        stderr.contains("then SRV records _matrix-fed._tcp.example.com, then connect to example.com:8448"),
        "discovery not named: {stderr}"
    );
    assert!(stderr.contains("Publish `well_known.server: \"example.com:443\"`"), "{stderr}");
    // A listener on 8448 serving federation: discovery finds it.
    let (code, stderr) = passing_edit(|t| {
        undelegated(t).replace(
            "serves: [well_known, client, federation] }\n",
            "serves: [well_known, client, federation] }\n  - { address: \"[::]:8448\", tls: true, serves: [federation] }\n",
        )
    });
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains(warning), "{stderr}");
    // Delegated (the shipped file as it is): no warning either.
    let (code, stderr) = passing_edit(|t| t.replace("max_age: 1h", "max_age: 2h"));
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains(warning), "{stderr}");
}

/// `check` works without a network: a name that does not resolve is a
/// warning naming it, and the rest of the config is still judged (a
/// mistake elsewhere still fails). A start still needs the name.
#[test]
fn check_judges_a_config_whose_names_do_not_resolve() {
    let unresolvable = |t: &str| t.replace("main: 127.0.0.1:8008", "main: synapse.invalid:8008");
    let (code, stderr) = passing_edit(unresolvable);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("synapse.invalid"), "{stderr}");
    assert!(stderr.contains("its address was not checked"), "{stderr}");
    let (code, stderr) = check_edited(|t| unresolvable(t).replace("  allow: [", "  alow: ["));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("unknown field `alow`"), "{stderr}");
}
