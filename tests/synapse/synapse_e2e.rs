//! A real Synapse (from PyPI, SQLite) behind the real edge, driven over TLS
//! like a client would: register, log in, create a room, send, sync
//! (initial and long-poll), a sync compressed that decompresses to exactly
//! what Synapse sent, upload and download 20 MB, and check that
//! Synapse recorded the client's real address despite a forged
//! `X-Forwarded-For`.
//!
//! Needs the Synapse virtualenv that `scripts/test` installs; set
//! `MATRIX_EDGE_SYNAPSE_PYTHON` to use another one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use support::certs::TestPki;
use support::matrix::{encode, Client, CLIENT_IP, FORGED_IP, HOST};
use support::synapse::Synapse;
use support::{free_port, EdgeProcess};

const SERVER_NAME: &str = "example.com";

fn room_messages(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["type"] == "m.room.message")
                .map(|e| e["content"]["body"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Uploads `bytes` through the edge; returns the media ID Synapse gave.
async fn upload(client: &Client, name: &str, bytes: &[u8]) -> String {
    let upload = client
        .request(reqwest::Method::POST, &format!("/_matrix/media/v3/upload?filename={name}"))
        .header("Content-Type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    let uri = upload.json::<Value>().await.unwrap()["content_uri"].as_str().unwrap().to_string();
    uri.rsplit('/').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Synapse from PyPI: run scripts/test"]
async fn a_real_client_flow_through_the_edge() {
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&[&[HOST], &[SERVER_NAME]]);
    let synapse_port = free_port();
    let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let public_baseurl = format!("https://{HOST}:{}/", edge_addr.port());
    let synapse = Synapse::start(&work.path().join("synapse"), synapse_port, SERVER_NAME, &public_baseurl);
    // The edge reaches Synapse through a relay that can record its answers.
    let tee = support::tee::Tee::start(format!("127.0.0.1:{synapse_port}").parse().unwrap());
    let config = format!(
        r#"server_name: {SERVER_NAME}
listeners:
  - {{ address: "{edge_addr}", tls: true, serves: [well_known, client, federation] }}
tls:
  certificates:
    - {{ cert: certs/{HOST}/fullchain.pem, key: certs/{HOST}/privkey.pem }}
    - {{ cert: certs/{SERVER_NAME}/fullchain.pem, key: certs/{SERVER_NAME}/privkey.pem }}
well_known:
  server: {HOST}:{port}
  client: {{ homeserver: "https://{HOST}:{port}" }}
synapse:
  main: "{tee}"
  media_cache: {{ memory: 64M, max_object: 8M }}
limits: {{ max_upload_size: 50M }}
metrics: {{ address: "{metrics}" }}
"#,
        port = edge_addr.port(),
        tee = tee.address,
        metrics = metrics_addr
    );
    let edge = EdgeProcess::start(&config, Some(&pki), &[edge_addr]);

    let mut alice = Client::new(edge_addr, &pki.root_pem, false);
    let (status, versions) = alice.json(reqwest::Method::GET, "/_matrix/client/versions", None).await;
    assert_eq!(status, 200, "{versions}");
    let discovery = alice.http.get(format!("{}/.well-known/matrix/client", alice.base)).send().await.unwrap();
    assert_eq!(discovery.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        discovery.json::<Value>().await.unwrap()["m.homeserver"]["base_url"],
        format!("https://{HOST}:{}", edge_addr.port())
    );

    // Register and log in.
    let token = alice.register_and_login("alice", "correct horse battery").await;

    // Room and message.
    let (status, room) =
        alice.json(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(json!({"name": "edge"}))).await;
    assert_eq!(status, 200, "{room}");
    let room_id = room["room_id"].as_str().unwrap().to_string();
    let send_path = |txn: &str| format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", encode(&room_id));
    let (status, sent) = alice
        .json(
            reqwest::Method::PUT,
            &send_path("t1"),
            Some(json!({"msgtype": "m.text", "body": "hello through the edge"})),
        )
        .await;
    assert_eq!(status, 200, "{sent}");

    let (status, initial) = alice.json(reqwest::Method::GET, "/_matrix/client/v3/sync?timeout=0", None).await;
    assert_eq!(status, 200);
    assert!(room_messages(&initial, &room_id).contains(&"hello through the edge".to_string()), "{initial}");
    let since = initial["next_batch"].as_str().unwrap().to_string();

    // A long-poll sync is answered when a message arrives from another connection (h1 this time).
    let mut bob_device = Client::new(edge_addr, &pki.root_pem, true);
    bob_device.token = Some(token.clone());
    let long_poll = {
        let path = format!("/_matrix/client/v3/sync?timeout=20000&since={since}");
        let request = alice.request(reqwest::Method::GET, &path);
        tokio::spawn(async move { request.send().await.unwrap().json::<Value>().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = bob_device
        .json(
            reqwest::Method::PUT,
            &send_path("t2"),
            Some(json!({"msgtype": "m.text", "body": "second, over http/1.1"})),
        )
        .await;
    assert_eq!(status, 200);
    let incremental = tokio::time::timeout(Duration::from_secs(30), long_poll).await.unwrap().unwrap();
    assert_eq!(room_messages(&incremental, &room_id), ["second, over http/1.1"], "{incremental}");

    // Compressed for the client: an initial sync through the edge, asked
    // for with gzip, decompresses to exactly the bytes Synapse sent for it
    // (recorded between the two), which Synapse sent uncompressed.
    tee.record();
    let gzipped = alice
        .request(reqwest::Method::GET, "/_matrix/client/v3/sync?timeout=0")
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(gzipped.headers().get("content-encoding").map(|v| v.as_bytes()), Some(&b"gzip"[..]));
    let compressed = gzipped.bytes().await.unwrap();
    let from_synapse = tee.recorded_body().expect("Synapse's whole answer was not recorded");
    let mut through_edge = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&compressed[..]), &mut through_edge).unwrap();
    assert!(through_edge == from_synapse, "the decompressed sync differs from what Synapse sent");
    assert!(compressed.len() < from_synapse.len(), "gzip made the sync larger");
    eprintln!("initial sync: {} bytes from Synapse, {} gzipped to the client", from_synapse.len(), compressed.len());

    // The media cache: a 1 MB file downloaded ten times by two devices is
    // sent by Synapse once; every other download is revalidated with its
    // own token and answered 304 by Synapse, the bytes from the edge.
    let small: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let small_id = upload(&alice, "small.bin", &small).await;
    let small_path = format!("/_matrix/client/v1/media/download/{SERVER_NAME}/{small_id}");
    for n in 0..10 {
        let client = if n % 2 == 0 { &alice } else { &bob_device };
        let download = client.request(reqwest::Method::GET, &small_path).send().await.unwrap();
        assert_eq!(download.status(), 200, "download {n}");
        assert!(download.bytes().await.unwrap() == small[..], "download {n} came back different");
    }
    // A range in the middle, after the same revalidation.
    let ranged =
        alice.request(reqwest::Method::GET, &small_path).header("Range", "bytes=500000-500099").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert!(ranged.bytes().await.unwrap() == small[500_000..500_100], "the range's bytes differ");
    // A bad token gets Synapse's 401, never the bytes.
    let mut stranger = Client::new(edge_addr, &pki.root_pem, false);
    stranger.token = Some("syt_not_a_token".into());
    let refused = stranger.request(reqwest::Method::GET, &small_path).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.bytes().await.unwrap().len() < 1000, "a bad token got the file");
    let log = std::fs::read_to_string(synapse.dir.join("homeserver.log")).unwrap();
    let statuses: Vec<String> = log
        .lines()
        .filter(|l| l.contains("synapse.access.http") && l.contains(&format!("\"GET {small_path} ")))
        .filter_map(|l| l.split('"').next()?.split_whitespace().last().map(str::to_string))
        .collect();
    let full = statuses.iter().filter(|s| s.starts_with("200")).count();
    let revalidated = statuses.iter().filter(|s| s.starts_with("304")).count();
    eprintln!("media cache: Synapse answered {statuses:?}");
    assert_eq!((full, revalidated), (1, 10), "Synapse's answers for the cached file: {statuses:?}");
    assert_eq!(statuses.iter().filter(|s| s.starts_with("401")).count(), 1, "{statuses:?}");
    let counted = |outcome: &str| {
        support::client::metric(
            metrics_addr,
            &format!("matrix_edge_media_cache_requests_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!((counted("miss"), counted("revalidated")), (Some(1.0), Some(10.0)));

    // 20 MB up and down, streamed through the edge.
    let blob: Vec<u8> = (0..20 * 1024 * 1024).map(|i: usize| (i % 251) as u8).collect();
    let media_id = upload(&alice, "blob.bin", &blob).await;
    for client in [&alice, &bob_device] {
        let download = client
            .request(reqwest::Method::GET, &format!("/_matrix/client/v1/media/download/{SERVER_NAME}/{media_id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(download.status(), 200);
        let body = download.bytes().await.unwrap();
        assert_eq!(body.len(), blob.len());
        assert!(body[..] == blob[..], "downloaded bytes differ");
    }

    // Synapse saw the client's real address, never the forged one.
    let (status, whois) =
        alice.json(reqwest::Method::GET, "/_matrix/client/v3/admin/whois/%40alice%3Aexample.com", None).await;
    assert_eq!(status, 200, "{whois}");
    let text = whois.to_string();
    assert!(text.contains(CLIENT_IP), "{text}");
    assert!(!text.contains(FORGED_IP), "{text}");
    let access_log = std::fs::read_to_string(synapse.dir.join("homeserver.log")).unwrap();
    let proxied: Vec<&str> = access_log.lines().filter(|l| l.contains("synapse.access.http")).collect();
    assert!(!proxied.is_empty());
    assert!(proxied.iter().all(|l| !l.contains(FORGED_IP)), "Synapse logged the forged address");
    assert!(proxied.iter().any(|l| l.contains(CLIENT_IP)));

    // One request, one ID in both access logs (Synapse's listener reads
    // X-Request-ID: `request_id_header`).
    let log = edge.log_text();
    let edge_line =
        log.lines().find(|l| l.contains("\"POST /_matrix/client/v3/createRoom")).expect("no edge access line");
    let id = edge_line.rsplit_once("request_id=").map(|(_, id)| id.trim()).expect("no request_id on the edge's line");
    let synapse_line = proxied
        .iter()
        .find(|l| l.contains(&format!("POST-{id} ")))
        .unwrap_or_else(|| panic!("Synapse logged no request with the edge's ID {id}:\n{}", proxied.join("\n")));
    assert!(synapse_line.contains("/_matrix/client/v3/createRoom"), "{synapse_line}");

    // Every log line of the run holds the flow but never the access token.
    let log = edge.log_text();
    assert!(log.contains("/_matrix/client/v3/createRoom"), "{log}");
    let secret = token.rsplit_once('_').map_or(token.as_str(), |(rest, _)| rest);
    for (name, text) in [
        ("edge", log),
        ("synapse", std::fs::read_to_string(synapse.dir.join("homeserver.log")).unwrap()),
        ("synapse stderr", std::fs::read_to_string(synapse.dir.join("stderr.log")).unwrap_or_default()),
    ] {
        let leaks: Vec<&str> = text.lines().filter(|l| l.contains(&token) || l.contains(secret)).collect();
        assert!(leaks.is_empty(), "the access token is in the {name} log: {leaks:?}");
    }
}
