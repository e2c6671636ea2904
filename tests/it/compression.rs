//! Synapse's JSON compressed for clients that ask, against the real binary:
//! decoded, the client reads exactly what Synapse sent; media, tokens,
//! tiny answers and answers already encoded go through as they are.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::io::Read;
use std::net::SocketAddr;
use support::upstream::RecordingUpstream;
use support::{free_port, EdgeProcess};

fn get(edge: SocketAddr, target: &str, accept_encoding: Option<&str>) -> support::client::Response {
    let encoding = accept_encoding.map(|value| format!("Accept-Encoding: {value}\r\n")).unwrap_or_default();
    let raw = format!("GET {target} HTTP/1.1\r\nHost: example.com\r\n{encoding}Connection: close\r\n\r\n");
    support::client::h1_plain(edge, raw.as_bytes()).0
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

#[test]
fn json_is_compressed_for_clients_that_ask_and_nothing_else_is() {
    let upstream = RecordingUpstream::start();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = format!(
        "server_name: example.com\nlisteners: [{{ address: \"{listen}\", serves: [client, federation] }}]\nsynapse: {{ main: \"{}\" }}\nfederation: {{ verify: {{ mode: off }} }}\n",
        upstream.addr
    );
    let edge = EdgeProcess::start(&config, None, &[listen]);

    // A sync-sized answer: gzip for a client that asks, the same bytes decoded.
    let sync = "/_matrix/client/v3/sync/json/200000";
    let plain = get(listen, sync, None);
    assert_eq!(plain.status, 200);
    assert!(plain.header("content-encoding").is_none());
    let compressed = get(listen, sync, Some("gzip"));
    assert_eq!(compressed.header("content-encoding"), Some("gzip"), "{:?}", compressed.headers);
    assert!(compressed.header("vary").is_some_and(|vary| vary.to_ascii_lowercase().contains("accept-encoding")));
    assert!(compressed.body.len() * 10 < plain.body.len(), "{} of {} bytes", compressed.body.len(), plain.body.len());
    assert_eq!(gunzip(&compressed.body), plain.body);

    // Federation answers too.
    let federation = get(listen, "/_matrix/federation/v1/state_ids/json/50000", Some("gzip"));
    assert_eq!(federation.header("content-encoding"), Some("gzip"));

    // Never: media, answers carrying tokens, tiny answers, answers encoded already.
    for (what, target) in [
        ("media", "/_matrix/client/v1/media/download/json/50000"),
        ("login", "/_matrix/client/v3/login/json/50000"),
        ("register", "/_matrix/client/v3/register/json/50000"),
        ("tiny", "/_matrix/client/v3/sync/json/100"),
    ] {
        let answer = get(listen, target, Some("gzip, br, zstd"));
        assert_eq!(answer.status, 200, "{what}");
        assert!(answer.header("content-encoding").is_none(), "{what} was compressed: {:?}", answer.headers);
    }
    let encoded = get(listen, "/_matrix/client/v3/sync/json-gzipped/50000", Some("gzip"));
    assert_eq!(encoded.header("content-encoding"), Some("gzip"));
    let sent_by_upstream = get(listen, "/_matrix/client/v3/sync/json/50000", None).body;
    assert_eq!(encoded.body, sent_by_upstream, "an answer encoded already was encoded again");

    // Turned off in the config: nothing compressed.
    drop(edge);
    let off = format!("{config}compression: {{ enabled: false }}\n");
    let _edge = EdgeProcess::start(&off, None, &[listen]);
    assert!(get(listen, sync, Some("gzip")).header("content-encoding").is_none());
}
