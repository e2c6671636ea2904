//! A real Synapse with `matrix_authentication_service` enabled behind the
//! edge, and a stand-in for MAS speaking MAS's protocol (the compatibility
//! `/login`, token introspection, provisioning through `/_synapse/mas/`):
//! a client logs in through the edge (MAS answers, Synapse never sees
//! `/login`), then creates a room, sends and reads a message on Synapse with
//! MAS's token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use serde_json::json;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use support::certs::TestPki;
use support::matrix::{encode, synapse_python, Client, HOST};
use support::synapse::Synapse;
use support::{free_port, EdgeProcess};

const SERVER_NAME: &str = "example.com";
const SECRET: &str = "a-shared-secret-between-mas-and-synapse";

/// The stand-in, killed on drop, with the request lines it printed.
struct MasStandIn {
    child: Child,
    seen: Arc<Mutex<Vec<String>>>,
}

impl MasStandIn {
    fn start(port: u16, synapse_port: u16) -> MasStandIn {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/py/mas_standin.py");
        let mut child = Command::new(synapse_python())
            .arg(script)
            .args([&port.to_string(), &format!("http://127.0.0.1:{synapse_port}"), SECRET, SERVER_NAME])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                writer.lock().unwrap().push(line);
            }
        });
        MasStandIn { child, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for MasStandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Synapse from PyPI: run scripts/test"]
async fn a_client_logs_in_through_mas_and_uses_synapse_with_its_token() {
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&[&[HOST], &[SERVER_NAME]]);
    let (synapse_port, mas_port) = (free_port(), free_port());
    let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mas = MasStandIn::start(mas_port, synapse_port);
    let mas_url = format!("http://127.0.0.1:{mas_port}/");
    let public_baseurl = format!("https://{HOST}:{}/", edge_addr.port());
    let synapse_dir = work.path().join("synapse");
    let _synapse = Synapse::start_with(
        &synapse_dir,
        synapse_port,
        SERVER_NAME,
        &public_baseurl,
        &["--mas", &mas_url, "--mas-secret", SECRET],
    );
    let config = format!(
        r#"server_name: {SERVER_NAME}
listeners:
  - {{ address: "{edge_addr}", tls: true, serves: [well_known, client, federation] }}
tls:
  certificates:
    - {{ cert: certs/{HOST}/fullchain.pem, key: certs/{HOST}/privkey.pem }}
    - {{ cert: certs/{SERVER_NAME}/fullchain.pem, key: certs/{SERVER_NAME}/privkey.pem }}
well_known:
  client: {{ homeserver: "https://{HOST}:{port}" }}
synapse:
  main: 127.0.0.1:{synapse_port}
  mas: 127.0.0.1:{mas_port}
process: {{ threads: 2 }}
"#,
        port = edge_addr.port()
    );
    let edge = EdgeProcess::start(&config, Some(&pki), &[edge_addr]);
    let mut client = Client::new(edge_addr, &pki.root_pem, false);

    // The login flows and the login itself come from MAS.
    let (status, flows) = client.json(reqwest::Method::GET, "/_matrix/client/v3/login", None).await;
    assert_eq!((status, &flows["flows"][0]["type"]), (200, &json!("m.login.password")), "{flows}");
    let wrong =
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "no"});
    let (status, refused) = client.json(reqwest::Method::POST, "/_matrix/client/v3/login", Some(wrong)).await;
    assert_eq!((status, &refused["errcode"]), (403, &json!("M_FORBIDDEN")));
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "mas-password"});
    let (status, session) = client.json(reqwest::Method::POST, "/_matrix/client/v3/login", Some(login)).await;
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["user_id"], format!("@alice:{SERVER_NAME}"));
    let token = session["access_token"].as_str().unwrap().to_string();
    assert!(token.starts_with("mat_"), "{token}");
    client.token = Some(token);

    // Synapse accepts MAS's token (it asks MAS by introspection).
    let (status, whoami) = client.json(reqwest::Method::GET, "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!((status, &whoami["user_id"]), (200, &json!(format!("@alice:{SERVER_NAME}"))), "{whoami}");
    let (status, room) = client.json(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(json!({}))).await;
    assert_eq!(status, 200, "{room}");
    let room_id = room["room_id"].as_str().unwrap().to_string();
    let send = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/txn1", encode(&room_id));
    let (status, sent) =
        client.json(reqwest::Method::PUT, &send, Some(json!({"msgtype": "m.text", "body": "hello via MAS"}))).await;
    assert_eq!(status, 200, "{sent}");
    let (status, sync) = client.json(reqwest::Method::GET, "/_matrix/client/v3/sync?timeout=0", None).await;
    assert_eq!(status, 200);
    let events = sync["rooms"]["join"][&room_id]["timeline"]["events"].as_array().unwrap();
    assert!(events.iter().any(|e| e["content"]["body"] == "hello via MAS"), "{sync}");
    let messages = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10", encode(&room_id));
    let (status, page) = client.json(reqwest::Method::GET, &messages, None).await;
    assert_eq!(status, 200);
    assert!(page["chunk"].as_array().unwrap().iter().any(|e| e["content"]["body"] == "hello via MAS"), "{page}");

    // Synapse relays MAS's issuer as its auth metadata (Synapse's own path).
    let (status, metadata) = client.json(reqwest::Method::GET, "/_matrix/client/v1/auth_metadata", None).await;
    assert_eq!((status, &metadata["issuer"]), (200, &json!(mas_url)), "{metadata}");

    // MAS's private API into Synapse is not reachable through the edge.
    let provision = client
        .request(reqwest::Method::POST, "/_synapse/mas/provision_user")
        .bearer_auth(SECRET)
        .json(&json!({"localpart": "mallory"}))
        .send()
        .await
        .unwrap();
    assert_eq!(provision.status().as_u16(), 404);

    // Logout goes to MAS too; the token is dead for Synapse afterwards.
    let (status, _) = client.json(reqwest::Method::POST, "/_matrix/client/v3/logout", Some(json!({}))).await;
    assert_eq!(status, 200);
    let (status, after) = client.json(reqwest::Method::GET, "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!((status, &after["errcode"]), (401, &json!("M_UNKNOWN_TOKEN")), "{after}");

    let seen = mas.seen();
    for expected in [
        "GET /_matrix/client/v3/login",
        "POST /_matrix/client/v3/login",
        "POST /oauth2/introspect",
        "POST /_matrix/client/v3/logout",
    ] {
        assert!(seen.iter().any(|line| line == expected), "MAS never saw {expected}: {seen:?}");
    }
    // Synapse's access log: the client's API calls, and never /login or /logout.
    let log = std::fs::read_to_string(synapse_dir.join("homeserver.log")).unwrap();
    assert!(log.contains("/_matrix/client/v3/createRoom"), "Synapse's access log lacks the room creation");
    for line in log.lines().filter(|l| l.contains("synapse.access.http")) {
        assert!(!line.contains("/login") && !line.contains("/logout"), "Synapse saw a login path: {line}");
    }
    assert!(!edge.log_text().contains("panicked"));
}
