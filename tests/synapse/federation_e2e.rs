//! Two real Synapse servers federating through two edges, both in
//! `enforce`: every federation request either edge lets through has had its
//! X-Matrix signature checked against the sending server's keys, fetched
//! through the other edge. Join, messages both ways, backfill, typing,
//! device lists and media must all work, a signing key rotated on one
//! Synapse (new key, restart) must be picked up, and each edge's metrics
//! must show requests verified and none refused.
//!
//! Needs the Synapse virtualenv that `scripts/test` installs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use reqwest::Method;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use support::certs::TestPki;
use support::matrix::{encode, synapse_python, Client};
use support::synapse::Synapse;
use support::{free_port, EdgeProcess};

/// One homeserver: its Synapse behind its edge, named `localhost:<edge port>`.
struct Homeserver {
    name: String,
    edge_address: SocketAddr,
    metrics: SocketAddr,
    synapse_port: u16,
    synapse_dir: std::path::PathBuf,
    synapse: Option<Synapse>,
    edge: EdgeProcess,
}

impl Homeserver {
    fn start(work: &Path, label: &str, ports: (u16, u16), peer_port: u16, pki: &TestPki) -> Homeserver {
        let (edge_port, synapse_port) = ports;
        let name = format!("localhost:{edge_port}");
        let edge_address: SocketAddr = format!("127.0.0.1:{edge_port}").parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let root = work.join("root.pem");
        std::fs::write(&root, &pki.root_pem).unwrap();
        // Synapse reaches the other server by its name, localhost:<port>,
        // which is the other edge; loopback must be allowed for that, and
        // the test root trusted.
        let yaml = format!(
            "ip_range_whitelist: [\"127.0.0.0/8\", \"::1/128\"]\nfederation_custom_ca_list: [\"{}\"]\n",
            root.display()
        );
        let synapse_dir = work.join(label);
        let synapse =
            Synapse::start_with_yaml(&synapse_dir, synapse_port, &name, &format!("https://{name}/"), &[], &yaml);
        let config = format!(
            r#"server_name: "{name}"
listeners:
  - {{ address: "{edge_address}", tls: true, serves: [client, federation] }}
tls:
  certificates:
    - {{ cert: certs/localhost/fullchain.pem, key: certs/localhost/privkey.pem }}
synapse:
  main: 127.0.0.1:{synapse_port}
limits: {{ max_upload_size: 50M }}
federation:
  verify:
    mode: enforce
    ca_file: certs/ca.pem
    connect_to: ["localhost:{peer_port}:127.0.0.1:{peer_port}"]
metrics: {{ address: "{metrics}" }}
process: {{ threads: 2 }}
"#
        );
        let edge = EdgeProcess::start(&config, Some(pki), &[edge_address, metrics]);
        Homeserver { name, edge_address, metrics, synapse_port, synapse_dir, synapse: Some(synapse), edge }
    }

    /// A counter from the edge's `/metrics`, 0 when absent.
    fn metric(&self, line_start: &str) -> u64 {
        let mut stream = TcpStream::connect(self.metrics).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text.lines()
            .filter(|line| line.starts_with(line_start))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|value| value as u64)
            .sum()
    }

    fn verified(&self) -> u64 {
        self.metric("matrix_edge_federation_requests_total{outcome=\"verified\"")
    }

    fn refused(&self) -> u64 {
        self.metric("matrix_edge_federation_requests_total{outcome=\"refused\"")
    }

    fn unverifiable(&self) -> u64 {
        self.metric("matrix_edge_federation_requests_total{outcome=\"unverifiable\"")
    }

    fn user(&self, pki: &TestPki) -> User {
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(pki.root_pem.as_bytes()).unwrap())
            .resolve("localhost", self.edge_address)
            .timeout(Duration::from_secs(90))
            .build()
            .unwrap();
        User { client: Client { http, base: format!("https://{}", self.name), token: None }, user_id: String::new() }
    }
}

struct User {
    client: Client,
    user_id: String,
}

impl User {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.client.json(method, path, body).await
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.call(method, path, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
        answer
    }

    async fn register(&mut self, name: &str) {
        let body = json!({"username": name, "password": "correct horse battery", "auth": {"type": "m.login.dummy"}});
        let answer = self.ok(Method::POST, "/_matrix/client/v3/register", Some(body)).await;
        self.client.token = answer["access_token"].as_str().map(str::to_string);
        self.user_id = answer["user_id"].as_str().unwrap().to_string();
    }

    /// A second device for the same account: a fresh login.
    async fn login_again(&self, name: &str) -> (String, String) {
        let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": name},
            "password": "correct horse battery"});
        let answer = self.ok(Method::POST, "/_matrix/client/v3/login", Some(body)).await;
        (answer["access_token"].as_str().unwrap().to_string(), answer["device_id"].as_str().unwrap().to_string())
    }

    async fn send(&self, room: &str, body: &str) {
        let txn =
            format!("t{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", encode(room));
        self.ok(Method::PUT, &path, Some(json!({"msgtype": "m.text", "body": body}))).await;
    }

    /// Syncs (long-polling from `since`) until `wanted` holds for a
    /// response, returning it and the next token; fails after 60 s.
    async fn sync_until(&self, since: &str, what: &str, wanted: impl Fn(&Value) -> bool) -> (Value, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut since = since.to_string();
        loop {
            assert!(Instant::now() < deadline, "{} never saw {what}", self.user_id);
            let path = if since.is_empty() {
                "/_matrix/client/v3/sync?timeout=0".to_string()
            } else {
                format!("/_matrix/client/v3/sync?timeout=5000&since={since}")
            };
            let answer = self.ok(Method::GET, &path, None).await;
            since = answer["next_batch"].as_str().unwrap().to_string();
            if wanted(&answer) {
                return (answer, since);
            }
        }
    }
}

fn timeline_bodies(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|events| events.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Replaces `dir`'s signing key with a new one under another key id.
fn rotate_signing_key(dir: &Path) {
    let key_path = dir.join("signing.key");
    let status = std::process::Command::new(synapse_python())
        .args(["-m", "synapse._scripts.generate_signing_key", "-o"])
        .arg(&key_path)
        .status()
        .unwrap();
    assert!(status.success(), "generate_signing_key failed");
    // The script names every key a_<random>; make sure ours differs from the old one anyway.
    let text = std::fs::read_to_string(&key_path).unwrap();
    let mut fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "unexpected signing key format: {text}");
    fields[1] = "rotated";
    std::fs::write(&key_path, format!("{}\n", fields.join(" "))).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Synapse from PyPI: run scripts/test"]
async fn two_synapses_federate_through_two_enforcing_edges() {
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&[&["localhost"]]);
    let (edge_a, edge_b) = (free_port(), free_port());
    let a = Homeserver::start(work.path(), "a", (edge_a, free_port()), edge_b, &pki);
    let mut b = Homeserver::start(work.path(), "b", (edge_b, free_port()), edge_a, &pki);

    let mut alice = a.user(&pki);
    alice.register("alice").await;
    let mut bob = b.user(&pki);
    bob.register("bob").await;

    // A public room on A with history bob's server has never seen.
    let room = alice
        .ok(Method::POST, "/_matrix/client/v3/createRoom", Some(json!({"preset": "public_chat", "name": "edges"})))
        .await["room_id"]
        .as_str()
        .unwrap()
        .to_string();
    for n in 0..30 {
        alice.send(&room, &format!("history {n}")).await;
    }

    // Join over federation (make_join, send_join, through both edges).
    // A's edge fetches B's keys from here on, not before.
    let first_contact = Instant::now();
    let (status, joined) = bob
        .call(Method::POST, &format!("/_matrix/client/v3/join/{}?server_name={}", encode(&room), a.name), None)
        .await;
    assert_eq!(status, 200, "bob could not join over federation: {joined}");

    // Backfill: paginating back from the join reaches the first message.
    let mut from = String::new();
    let mut seen_first = false;
    for _ in 0..10 {
        let mut path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20", encode(&room));
        if !from.is_empty() {
            path.push_str(&format!("&from={from}"));
        }
        let page = bob.ok(Method::GET, &path, None).await;
        let bodies: Vec<&str> =
            page["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
        if bodies.contains(&"history 0") {
            seen_first = true;
            break;
        }
        match page["end"].as_str() {
            Some(end) => from = end.to_string(),
            None => break,
        }
    }
    assert!(seen_first, "bob's server did not backfill the room's history from alice's");

    // Messages both ways.
    let (_, mut alice_since) = alice.sync_until("", "an initial sync", |_| true).await;
    let (_, mut bob_since) = bob.sync_until("", "an initial sync", |_| true).await;
    alice.send(&room, "hello bob").await;
    (_, bob_since) = bob
        .sync_until(&bob_since, "alice's message", |s| timeline_bodies(s, &room).contains(&"hello bob".to_string()))
        .await;
    bob.send(&room, "hello alice").await;
    (_, alice_since) = alice
        .sync_until(&alice_since, "bob's message", |s| timeline_bodies(s, &room).contains(&"hello alice".to_string()))
        .await;

    // Typing: an EDU in a transaction from A to B.
    let typing_path = format!("/_matrix/client/v3/rooms/{}/typing/{}", encode(&room), encode(&alice.user_id));
    alice.ok(Method::PUT, &typing_path, Some(json!({"typing": true, "timeout": 30000}))).await;
    let alice_id = alice.user_id.clone();
    bob.sync_until(&bob_since, "alice typing", |s| {
        s["rooms"]["join"][&room]["ephemeral"]["events"].as_array().is_some_and(|events| {
            events.iter().any(|e| {
                e["type"] == "m.typing"
                    && e["content"]["user_ids"].as_array().is_some_and(|ids| ids.contains(&json!(alice_id)))
            })
        })
    })
    .await;

    // Device lists: alice asks for bob's keys (a signed POST to B), then a
    // new device of bob's with keys reaches her as a device list update.
    let query = json!({"device_keys": {bob.user_id.clone(): []}});
    let answer = alice.ok(Method::POST, "/_matrix/client/v3/keys/query", Some(query.clone())).await;
    assert!(answer["failures"].as_object().is_none_or(|f| f.is_empty()), "keys/query over federation failed: {answer}");
    let (phone_token, phone_device) = bob.login_again("bob").await;
    let phone = User {
        client: Client { http: bob.client.http.clone(), base: bob.client.base.clone(), token: Some(phone_token) },
        user_id: bob.user_id.clone(),
    };
    let device_keys = json!({"device_keys": {
        "user_id": bob.user_id, "device_id": phone_device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("ed25519:{phone_device}"): "dGVzdGtleWVkMjU1MTlwaG9uZWRldmljZWtleTAwMA",
                 format!("curve25519:{phone_device}"): "dGVzdGtleWN1cnZlMjU1MTlwaG9uZWRldmljZWtleTA"},
        "signatures": {bob.user_id.clone(): {format!("ed25519:{phone_device}"): "c2lnbmF0dXJl"}}
    }});
    phone.ok(Method::POST, "/_matrix/client/v3/keys/upload", Some(device_keys)).await;
    let bob_id = bob.user_id.clone();
    (_, alice_since) = alice
        .sync_until(&alice_since, "bob's new device", |s| {
            s["device_lists"]["changed"].as_array().is_some_and(|changed| changed.contains(&json!(bob_id)))
        })
        .await;
    let answer = alice.ok(Method::POST, "/_matrix/client/v3/keys/query", Some(query)).await;
    assert!(
        answer["device_keys"][&bob.user_id][&phone_device].is_object(),
        "alice does not see bob's new device over federation: {answer}"
    );

    // Media: uploaded on B, downloaded by alice through A (A fetches it from B).
    let picture: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let uploaded: Value = bob
        .client
        .request(Method::POST, "/_matrix/media/v3/upload?filename=p.bin")
        .header("Content-Type", "application/octet-stream")
        .body(picture.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uri = uploaded["content_uri"].as_str().unwrap_or_else(|| panic!("upload failed: {uploaded}"));
    let media_id = uri.rsplit('/').next().unwrap();
    let downloaded = alice
        .client
        .request(Method::GET, &format!("/_matrix/client/v1/media/download/{}/{media_id}", b.name))
        .send()
        .await
        .unwrap();
    assert_eq!(downloaded.status(), 200, "remote media through A");
    assert!(downloaded.bytes().await.unwrap() == picture, "remote media came back different");

    // Key rotation on B: a new signing key, Synapse restarted; A's edge has
    // not seen the key id and must fetch B's keys again. It asks an origin
    // for an unknown key id at most once in 10 s after a fetch, so a key
    // rotated sooner than that after first contact would be refused until
    // Synapse's retry; wait that out so the first transaction must pass.
    let fetches_before = a.metric("matrix_edge_federation_key_fetches_total{result=\"fetched\"}");
    drop(b.synapse.take());
    rotate_signing_key(&b.synapse_dir);
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(first_contact.elapsed())).await;
    b.synapse = Some(Synapse::restart(&b.synapse_dir, b.synapse_port));
    bob.send(&room, "after rotation").await;
    alice
        .sync_until(&alice_since, "bob's message signed with the new key", |s| {
            timeline_bodies(s, &room).contains(&"after rotation".to_string())
        })
        .await;
    assert!(
        a.metric("matrix_edge_federation_key_fetches_total{result=\"fetched\"}") > fetches_before,
        "A's edge verified B's new key without fetching it"
    );

    for (label, server) in [("A", &a), ("B", &b)] {
        assert!(server.verified() >= 5, "edge {label} verified only {} requests", server.verified());
        assert_eq!(server.refused(), 0, "edge {label} refused a real Synapse's request: {}", server.edge.log_text());
        assert_eq!(server.unverifiable(), 0, "edge {label} let requests through unverified");
    }
    eprintln!(
        "verified: A {} B {}; key fetches: A {} B {}",
        a.verified(),
        b.verified(),
        a.metric("matrix_edge_federation_key_fetches_total{result=\"fetched\"}"),
        b.metric("matrix_edge_federation_key_fetches_total{result=\"fetched\"}")
    );
}
