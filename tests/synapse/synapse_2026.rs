//! What a 2026 deployment needs around Synapse, through the real binary:
//! the rendezvous CORS preflight (QR-code login), MatrixRTC foci in the
//! client well-known, a homeserver that does not federate but keeps the
//! OpenID userinfo endpoint open, and MAS's private API into Synapse
//! reachable only from its listed network.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use std::io::{BufReader, Write};
use std::net::SocketAddr;
use std::time::Duration;
use support::certs::TestPki;
use support::client::{self, connect_from, h1_plain, h1_tls, h2_tls, read_response};
use support::upstream::RecordingUpstream;
use support::{free_port, EdgeProcess};

const SNI: &str = "synapse.example.com";

struct Setup {
    pki: TestPki,
    upstream: RecordingUpstream,
    _edge: EdgeProcess,
    public: SocketAddr,
    plain: SocketAddr,
}

fn setup() -> Setup {
    let pki = TestPki::new(&[&[SNI], &["example.com"]]);
    let upstream = RecordingUpstream::start();
    let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let plain: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        r#"server_name: example.com
listeners:
  - {{ address: "{public}", tls: true, serves: [well_known, client, federation] }}
  - {{ address: "{plain}", serves: [client, federation] }}
tls:
  certificates:
    - {{ cert: certs/{SNI}/fullchain.pem, key: certs/{SNI}/privkey.pem }}
    - {{ cert: certs/example.com/fullchain.pem, key: certs/example.com/privkey.pem }}
well_known:
  client:
    homeserver: https://{SNI}
    rtc_foci:
      - {{ type: livekit, livekit_service_url: "https://rtc.example.com" }}
synapse:
  main: "{}"
  federation: openid_only
admin_api:
  mas_allow: [127.0.0.3/32]
process: {{ threads: 2 }}
"#,
        upstream.addr
    );
    let edge = EdgeProcess::start(&config, Some(&pki), &[public, plain]);
    Setup { pki, upstream, _edge: edge, public, plain }
}

fn upstream_targets(upstream: &RecordingUpstream) -> Vec<String> {
    std::thread::sleep(Duration::from_millis(100));
    upstream.records().iter().map(|r| r.request_line.clone()).collect()
}

#[test]
fn rendezvous_preflights_get_the_headers_qr_login_needs_over_h1_and_h2() {
    let s = setup();
    let paths = [
        "/_matrix/client/unstable/org.matrix.msc4108/rendezvous",
        "/_matrix/client/unstable/io.element.msc4388/rendezvous/0ZtYwkv1",
        "/_synapse/client/rendezvous/01HXYZ",
    ];
    let preflight = [
        ("Origin", "https://app.element.io"),
        ("Access-Control-Request-Method", "PUT"),
        ("Access-Control-Request-Headers", "if-match,content-type"),
    ];
    for path in paths {
        let mut raw = format!("OPTIONS {path} HTTP/1.1\r\nHost: {SNI}\r\n");
        for (name, value) in preflight {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        let (h1, closed) = h1_tls(s.public, SNI, &s.pki.root_pem, raw.as_bytes());
        let h2 = h2_tls(s.public, SNI, &s.pki.root_pem, "OPTIONS", path, &preflight, None).unwrap();
        for response in [&h1, &h2] {
            assert_eq!(response.status, 204, "{path}: {response:?}");
            assert_eq!(response.header("access-control-allow-origin"), Some("*"));
            let allowed = response.header("access-control-allow-headers").unwrap().to_ascii_lowercase();
            assert!(
                allowed.contains("if-match") && allowed.contains("if-none-match") && allowed.contains("content-type")
            );
            assert!(response.header("access-control-expose-headers").unwrap().contains("ETag"), "{response:?}");
            assert!(response.header("access-control-allow-methods").unwrap().contains("PUT"));
            assert!(response.body.is_empty());
        }
        assert!(!closed);
    }
    assert!(upstream_targets(&s.upstream).is_empty(), "a preflight reached Synapse");
    // The real requests go to Synapse's main process untouched.
    let put =
        format!("PUT {} HTTP/1.1\r\nHost: {SNI}\r\nIf-Match: \"etag-1\"\r\nContent-Length: 2\r\n\r\nhi", paths[1]);
    let (response, _) = h1_tls(s.public, SNI, &s.pki.root_pem, put.as_bytes());
    assert_eq!(response.status, 200);
    let records = s.upstream.records();
    assert_eq!(records[0].request_line, format!("PUT {} HTTP/1.1", paths[1]));
    assert_eq!(records[0].header_values("if-match"), ["\"etag-1\""]);
    // Other Matrix paths get Synapse's own preflight answer from the edge.
    let (other, _) = h1_tls(
        s.public,
        SNI,
        &s.pki.root_pem,
        format!("OPTIONS /_matrix/client/v3/sync HTTP/1.1\r\nHost: {SNI}\r\n\r\n").as_bytes(),
    );
    assert_eq!(other.status, 204);
    assert_eq!(
        other.header("access-control-allow-headers"),
        Some("X-Requested-With, Content-Type, Authorization, Date")
    );
    assert_eq!(s.upstream.records().len(), 1);
}

#[test]
fn the_client_well_known_publishes_rtc_foci() {
    let s = setup();
    let (response, _) =
        h1_tls(s.public, "example.com", &s.pki.root_pem, &client::get("/.well-known/matrix/client", "example.com"));
    assert_eq!(response.status, 200);
    let body = response.json();
    assert_eq!(body["org.matrix.msc4143.rtc_foci"][0]["type"], "livekit");
    assert_eq!(body["org.matrix.msc4143.rtc_foci"][0]["livekit_service_url"], "https://rtc.example.com");
    assert_eq!(body["m.homeserver"]["base_url"], format!("https://{SNI}"));
}

#[test]
fn without_federation_only_openid_userinfo_stays_open() {
    let s = setup();
    let userinfo = "/_matrix/federation/v1/openid/userinfo?access_token=syt_abc";
    let (response, _) = h1_tls(s.public, SNI, &s.pki.root_pem, &client::get(userinfo, SNI));
    assert_eq!(response.status, 200);
    for target in [
        "/_matrix/federation/v1/version",
        "/_matrix/key/v2/server",
        "/_matrix/federation/v1/send/txn1",
        "/_matrix/federation/v1/openid/userinfo/../../version",
        "/_matrix/federation/v1/%6fpenid/userinfo",
    ] {
        let (refused, _) = h1_tls(s.public, SNI, &s.pki.root_pem, &client::get(target, SNI));
        refused.assert_matrix_error(404, "M_UNRECOGNIZED");
    }
    assert_eq!(upstream_targets(&s.upstream), [format!("GET {userinfo} HTTP/1.1")]);
}

#[test]
fn mas_api_into_synapse_only_from_its_network() {
    let s = setup();
    let raw = "POST /_synapse/mas/provision_user HTTP/1.1\r\nHost: synapse\r\nAuthorization: Bearer secret\r\nContent-Length: 2\r\n\r\n{}";
    let (refused, _) = h1_plain(s.plain, raw.as_bytes());
    refused.assert_matrix_error(404, "M_UNRECOGNIZED");
    let (refused, _) =
        h1_plain(s.plain, b"GET /_synapse/%6Das/query_user?localpart=a HTTP/1.1\r\nHost: synapse\r\n\r\n");
    refused.assert_matrix_error(404, "M_UNRECOGNIZED");
    assert!(upstream_targets(&s.upstream).is_empty());
    let mut from_mas = connect_from("127.0.0.3", s.plain);
    from_mas.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    from_mas.write_all(raw.as_bytes()).unwrap();
    let response = read_response(&mut BufReader::new(&from_mas), false).unwrap();
    assert_eq!(response.status, 200);
    let records = s.upstream.records();
    assert_eq!(records[0].request_line, "POST /_synapse/mas/provision_user HTTP/1.1");
    assert_eq!(records[0].header_values("x-forwarded-for"), ["127.0.0.3"]);
    assert_eq!(records[0].header_values("authorization"), ["Bearer secret"]);
}
