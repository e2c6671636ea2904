//! Real Synapse workers behind the edge: PostgreSQL, Redis, the main process,
//! two synchrotrons, a client reader, an event creator, a federation inbound
//! worker, a media repository and a typing writer (scripts/synapse_dev.py
//! workers). A client flow goes through the edge over TLS, and each process's
//! own access log must hold exactly the requests the routing table sends it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use matrix_edge::config::Source;
use matrix_edge::edge::Edge;
use matrix_edge::synapse::sticky::{self, KeySource};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::certs::TestPki;
use support::matrix::{encode, synapse_python, Client, HOST};
use support::{free_port, EdgeProcess};

struct Deployment {
    child: Child,
    info: Value,
    /// Lines the deployment prints after its first (answers to `restart`).
    lines: std::sync::mpsc::Receiver<String>,
}

impl Deployment {
    fn start(dir: &Path, public_baseurl: &str) -> Deployment {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/synapse_dev.py");
        let mut child = Command::new(synapse_python())
            .arg(script)
            .args(["workers"])
            .arg(dir)
            .args(["--server-name", "example.com", "--public-baseurl", public_baseurl])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.with_extension("stderr")).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(240)).unwrap_or_default();
        let info: Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!(
                "the worker deployment did not start: {}",
                std::fs::read_to_string(dir.with_extension("stderr")).unwrap_or_default()
            )
        });
        Deployment { child, info, lines: rx }
    }

    /// Stops one process (SIGTERM) and starts it again; returns once it is healthy.
    fn restart(&mut self, name: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "restart {name}").unwrap();
        stdin.flush().unwrap();
        let line = self.lines.recv_timeout(Duration::from_secs(180)).unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["restarted"], name, "{answer}");
    }

    /// Worker name for each address, and "main".
    fn names(&self) -> BTreeMap<String, String> {
        let mut names = BTreeMap::new();
        names.insert(self.info["main"].as_str().unwrap().to_string(), "main".to_string());
        for members in self.info["groups"].as_object().unwrap().values() {
            for member in members.as_array().unwrap() {
                names.insert(
                    member["address"].as_str().unwrap().to_string(),
                    member["name"].as_str().unwrap().to_string(),
                );
            }
        }
        names
    }

    /// (method, path) of every client-facing request in a process's access log.
    fn served(&self, name: &str) -> Vec<(String, String)> {
        let log = std::fs::read_to_string(self.info["logs"][name].as_str().unwrap()).unwrap_or_default();
        let mut requests: Vec<(String, String)> = log
            .lines()
            .filter(|l| l.contains("synapse.access.http") && l.contains("Processed request"))
            .filter_map(|l| {
                let quoted = l.split('"').nth(1)?;
                let mut parts = quoted.split(' ');
                let method = parts.next()?.to_string();
                let path = parts.next()?.split('?').next()?.to_string();
                Some((method, path))
            })
            .filter(|(_, path)| path.starts_with("/_matrix/") || path.starts_with("/_synapse/client/"))
            .collect();
        requests.sort();
        requests
    }
}

impl Deployment {
    /// Requests that carried one of the edge's request IDs, as every
    /// process's access log names them ("PUT-<id>"), with the process and
    /// the log line.
    fn edge_request_ids(&self) -> Vec<(String, String, String)> {
        let mut seen = Vec::new();
        for (name, log) in self.info["logs"].as_object().unwrap() {
            let text = std::fs::read_to_string(log.as_str().unwrap()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("synapse.access.http") && l.contains("Processed request")) {
                let Some(request) = line.split(" - ").nth(4) else { continue };
                let Some((_, id)) = request.split_once('-') else { continue };
                // The edge's IDs are 16 hex digits; Synapse's own are a counter.
                if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    seen.push((request.to_string(), name.clone(), line.to_string()));
                }
            }
        }
        seen
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // Closing stdin stops PostgreSQL, Redis and every Synapse process.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Synapse, PostgreSQL and Redis: run scripts/test"]
async fn each_worker_receives_exactly_what_the_table_sends_it() {
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&[&[HOST]]);
    let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let base_url = format!("https://{HOST}:{}", edge_addr.port());
    let mut deployment = Deployment::start(&work.path().join("synapse"), &format!("{base_url}/"));
    let groups = &deployment.info["groups"];
    let list = |group: &str| {
        let addresses: Vec<String> = groups[group]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| format!("\"{}\"", m["address"].as_str().unwrap()))
            .collect();
        format!("[{}]", addresses.join(", "))
    };
    let config = format!(
        r#"server_name: example.com
listeners:
  - {{ address: "{edge_addr}", tls: true, serves: [well_known, client, federation] }}
tls:
  certificates: [{{ cert: certs/{HOST}/fullchain.pem, key: certs/{HOST}/privkey.pem }}]
synapse:
  main: "{main}"
  workers:
    synchrotron: {sync}
    client_reader: {reader}
    event_creator: {creator}
    federation_inbound: {inbound}
    media_repository: {media}
  stream_writers:
    typing: {typing}
"#,
        main = deployment.info["main"].as_str().unwrap(),
        sync = list("synchrotron"),
        reader = list("client_reader"),
        creator = list("event_creator"),
        inbound = list("federation_inbound"),
        media = list("media_repository"),
        typing = list("typing"),
    );
    // `matrix-edge init` on Synapse's own files must route these workers as
    // the hand-written config does; the flow below then runs on its output.
    let synapse_dir = work.path().join("synapse");
    let init = Command::new(support::binary())
        .args(["init", "--from-synapse"])
        .arg(synapse_dir.join("main/homeserver.yaml"))
        .arg("--workers")
        .arg(&synapse_dir)
        .args(["--listen", &edge_addr.to_string()])
        .args(["--cert", &format!("certs/{HOST}/fullchain.pem"), "--key", &format!("certs/{HOST}/privkey.pem")])
        .output()
        .unwrap();
    assert!(init.status.success(), "init failed: {}", String::from_utf8_lossy(&init.stderr));
    let generated = String::from_utf8(init.stdout).unwrap();
    let inproc = work.path().join("inproc");
    pki.copy_into(&inproc.join("certs"));
    let load = |text: &str| {
        let source = Source { file: inproc.join("inline.yaml"), text: text.to_string() };
        Edge::from_config(source.parse().unwrap(), &source).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
    let (hand_written, from_init) = (load(&config), load(&generated));
    let route_of = |edge: &Edge, method: &str, target: &str| {
        let decision = edge.router.route(method, target.as_bytes());
        let members: Vec<String> = edge
            .pools
            .get(decision.group)
            .map(|pool| pool.members.iter().map(|m| m.upstream.address.to_string()).collect())
            .unwrap_or_else(|| vec![edge.main.address.to_string()]);
        (decision.sticky, members)
    };
    let lines = include_str!("../routing/requests.txt");
    let mut compared = 0;
    for line in lines.lines().filter(|l| !l.starts_with('#') && l.contains(" => ")) {
        let request = line.split(" => ").next().unwrap().split(" | ").next().unwrap();
        let Some((method, target)) = request.split_once(' ') else { continue };
        assert_eq!(
            route_of(&hand_written, method, target),
            route_of(&from_init, method, target),
            "{method} {target}: the generated config routes it elsewhere\n{generated}"
        );
        compared += 1;
    }
    assert!(compared > 200, "{compared}");
    // The later phases register and log in a few dozen users from one
    // address: the edge's login limit (30 a minute per address) would refuse them.
    let served_config = format!("{generated}\nrate_limits:\n  login: ~\n");
    let edge_process = EdgeProcess::start(&served_config, Some(&pki), &[edge_addr]);
    // The same table, loaded in-process, says where each request should land.
    let source = Source::read(&edge_process.config).unwrap();
    let table = Edge::from_config(source.parse().unwrap(), &source).unwrap();
    let names = deployment.names();
    let mut expected: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut sent = |method: &str, target: &str, token: Option<&str>| {
        let decision = table.router.route(method, target.as_bytes());
        let authorization = token.map(|t| format!("Bearer {t}"));
        let address = match table.pools.get(decision.group) {
            None => table.main.address.to_string(),
            Some(pool) => {
                let source = KeySource {
                    target: target.as_bytes(),
                    authorization: authorization.as_deref().map(str::as_bytes),
                    client_ip: None,
                };
                let key = sticky::key(decision.sticky, &source);
                let index = pool.pick(key.as_ref().map(|k| k.as_bytes()), &[]).unwrap();
                pool.members[index].upstream.address.to_string()
            }
        };
        let worker = names[&address].clone();
        let path = target.split('?').next().unwrap().to_string();
        expected.entry(worker).or_default().push((method.to_string(), path));
    };

    let mut alice = Client::new(edge_addr, &pki.root_pem, false);
    let (status, _) = alice.json(reqwest::Method::GET, "/_matrix/client/versions", None).await;
    assert_eq!(status, 200);
    sent("GET", "/_matrix/client/versions", None);

    let token = alice.register_and_login("alice", "correct horse battery").await;
    sent("POST", "/_matrix/client/v3/register", None);
    sent("POST", "/_matrix/client/v3/login", None);
    let t = Some(token.as_str());

    let (status, body) = alice.json(reqwest::Method::GET, "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!((status, body["user_id"].as_str()), (200, Some("@alice:example.com")));
    sent("GET", "/_matrix/client/v3/account/whoami", t);

    let (status, room) =
        alice.json(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(json!({"name": "workers"}))).await;
    assert_eq!(status, 200, "{room}");
    sent("POST", "/_matrix/client/v3/createRoom", t);
    let room_id = room["room_id"].as_str().unwrap().to_string();

    let send = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/w1", encode(&room_id));
    let (status, body) =
        alice.json(reqwest::Method::PUT, &send, Some(json!({"msgtype": "m.text", "body": "via workers"}))).await;
    assert_eq!(status, 200, "{body}");
    sent("PUT", &send, t);

    let typing = format!("/_matrix/client/v3/rooms/{}/typing/%40alice%3Aexample.com", encode(&room_id));
    let (status, body) =
        alice.json(reqwest::Method::PUT, &typing, Some(json!({"typing": true, "timeout": 5000}))).await;
    assert_eq!(status, 200, "{body}");
    sent("PUT", &typing, t);

    // Events reach the synchrotrons through replication; poll until the message shows.
    let mut found = false;
    for attempt in 0..20 {
        let target = "/_matrix/client/v3/sync?timeout=0";
        let (status, sync) = alice.json(reqwest::Method::GET, target, None).await;
        assert_eq!(status, 200);
        sent("GET", target, t);
        let events = &sync["rooms"]["join"][&room_id]["timeline"]["events"];
        if events.as_array().is_some_and(|e| e.iter().any(|e| e["content"]["body"] == "via workers")) {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
    }
    assert!(found, "the message never appeared in /sync");

    // Simplified Sliding Sync, as Element X syncs: the same synchrotron as /sync.
    let mut position: Option<String> = None;
    for _ in 0..3 {
        let target = match &position {
            Some(pos) => format!("/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos={pos}&timeout=0"),
            None => "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?timeout=0".to_string(),
        };
        let request = json!({"lists": {"all": {"ranges": [[0, 10]], "timeline_limit": 1, "required_state": []}}});
        let (status, body) = alice.json(reqwest::Method::POST, &target, Some(request)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["pos"].is_string(), "{body}");
        position = body["pos"].as_str().map(str::to_string);
        sent("POST", &target, t);
    }

    let messages = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5", encode(&room_id));
    let (status, _) = alice.json(reqwest::Method::GET, &messages, None).await;
    assert_eq!(status, 200);
    sent("GET", &messages, t);

    let blob: Vec<u8> = (0..1_000_000).map(|i: usize| (i % 253) as u8).collect();
    let upload = alice
        .request(reqwest::Method::POST, "/_matrix/media/v3/upload?filename=w.bin")
        .header("Content-Type", "application/octet-stream")
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    sent("POST", "/_matrix/media/v3/upload", t);
    let uri = upload.json::<Value>().await.unwrap()["content_uri"].as_str().unwrap().to_string();
    let download_path = format!("/_matrix/client/v1/media/download/example.com/{}", uri.rsplit('/').next().unwrap());
    let download = alice.request(reqwest::Method::GET, &download_path).send().await.unwrap();
    assert_eq!(download.status(), 200);
    assert!(download.bytes().await.unwrap()[..] == blob[..]);
    sent("GET", &download_path, t);

    let (status, _) = alice.json(reqwest::Method::GET, "/_matrix/client/v3/pushers", None).await;
    assert_eq!(status, 200);
    sent("GET", "/_matrix/client/v3/pushers", t);

    // An unsigned federation transaction: refused by the worker, but it is the worker that refuses.
    let federation = alice
        .http
        .put(format!("{}/_matrix/federation/v1/send/txn1", alice.base))
        .header(
            "Authorization",
            "X-Matrix origin=\"remote.example\",destination=\"example.com\",key=\"ed25519:a\",sig=\"x\"",
        )
        .json(&json!({"pdus": [], "edus": []}))
        .send()
        .await
        .unwrap();
    assert!(federation.status().is_client_error(), "{}", federation.status());
    expected
        .entry(names[&worker_for_origin(&table)].clone())
        .or_default()
        .push(("PUT".into(), "/_matrix/federation/v1/send/txn1".into()));

    tokio::time::sleep(Duration::from_secs(1)).await;
    for worker in names.values() {
        let mut want = expected.get(worker).cloned().unwrap_or_default();
        want.sort();
        assert_eq!(deployment.served(worker), want, "requests served by {worker}");
    }
    // Both synchrotrons exist; the user's syncs, sliding ones included, all went to one of them.
    assert!(expected.keys().filter(|w| w.starts_with("synchrotron")).count() == 1, "{expected:?}");
    let synchrotron = expected.keys().find(|w| w.starts_with("synchrotron")).unwrap();
    let sliding =
        deployment.served(synchrotron).iter().filter(|(_, path)| path.ends_with("simplified_msc3575/sync")).count();
    assert_eq!(sliding, 3, "{synchrotron} served {:?}", deployment.served(synchrotron));

    a_stopped_synchrotron_stalls_no_user(&deployment, &table, &edge_process, edge_addr, &pki.root_pem).await;

    // The stall above sends the stopped synchrotron's syncs again on purpose
    // (GETs it processes once it runs again); each restart run is judged on
    // the request IDs first logged during it.
    let mut judged: std::collections::BTreeSet<String> =
        deployment.edge_request_ids().into_iter().map(|(id, _, _)| id).collect();
    for drain in [true, false] {
        let outcome = rolling_restart(
            &mut deployment,
            &edge_process,
            edge_addr,
            &pki.root_pem,
            drain,
            if drain { "d" } else { "n" },
        )
        .await;
        let how = if drain { "draining each worker first" } else { "without draining" };
        eprintln!(
            "rolling restart of every worker then main, {how}: {} of {} requests failed {:?}; longest {:?}",
            outcome.failed.len(),
            outcome.total,
            tally(&outcome.failed),
            outcome.longest
        );
        assert!(outcome.total > 200, "too little traffic to judge: {}", outcome.total);
        if drain {
            assert!(
                outcome.failed.is_empty(),
                "requests failed during the drained rolling restart: {:?}",
                outcome.failed
            );
        }
        nothing_repeated_that_synapse_answered(&deployment, &mut judged, how);
    }

    // Two edges of one cluster (sharing Synapse's own Redis) behind HAProxy
    // (round robin, TLS passed through), the drains typed on the first
    // edge's CLI only: the second must stop sending to each worker too, and
    // `drain --wait` must wait for the second's requests as well.
    let redis = deployment.info["redis"].as_str().unwrap().to_string();
    let cluster = |name: &str| format!("cluster: {{ redis: \"redis://{redis}/0\", name: {name}, prefix: rolling }}\n");
    let second_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(&edge_process.config, format!("{served_config}{}", cluster("edge-a"))).unwrap();
    EdgeProcess::signal(edge_process.pid(), "HUP");
    let second_config =
        format!("{}{}", served_config.replace(&edge_addr.to_string(), &second_addr.to_string()), cluster("edge-b"));
    let second = EdgeProcess::start(&second_config, Some(&pki), &[second_addr]);
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _haproxy = support::haproxy_round_robin(work.path(), front, &[edge_addr, second_addr]);
    // Both edges in the fleet before the first drain.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, listed, _) = support::workers_cli(&edge_process, &["list"]);
        if listed.lines().any(|l| l.starts_with("edge-b ")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "edge-b never joined the fleet:\n{listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let outcome = rolling_restart(&mut deployment, &edge_process, front, &pki.root_pem, true, "h").await;
    let through_second = second.log_text().lines().filter(|l| l.contains("request_id=")).count();
    eprintln!(
        "rolling restart through two edges behind HAProxy, drained on one: {} of {} requests failed {:?}; longest {:?}; {through_second} through the second edge",
        outcome.failed.len(),
        outcome.total,
        tally(&outcome.failed),
        outcome.longest
    );
    assert!(outcome.total > 200, "too little traffic to judge: {}", outcome.total);
    assert!(through_second > 50, "HAProxy sent the second edge too little: {through_second}");
    assert!(outcome.failed.is_empty(), "requests failed through two edges: {:?}", outcome.failed);
    nothing_repeated_that_synapse_answered(&deployment, &mut judged, "through two edges");

    // The same restarts through nginx configured by Synapse's table (one
    // regex location per rule, round robin, its default retries), for
    // comparison: a measurement of nginx, not a check of the edge, so only
    // when asked for (MATRIX_EDGE_COMPARE_NGINX=1); it adds a third of this
    // test's time.
    if std::env::var_os("MATRIX_EDGE_COMPARE_NGINX").is_none() {
        return;
    }
    let nginx = Nginx::start(&table, edge_process.path(), work.path());
    let outcome = rolling_restart(&mut deployment, &edge_process, nginx.address, &pki.root_pem, false, "x").await;
    eprintln!(
        "rolling restart of every worker then main, through nginx: {} of {} requests failed {:?}; longest {:?}",
        outcome.failed.len(),
        outcome.total,
        tally(&outcome.failed),
        outcome.longest
    );
    assert!(outcome.total > 200, "too little traffic through nginx to judge: {}", outcome.total);
}

/// Nothing sent twice, as Synapse's own access logs tell (every process
/// logs the edge's X-Request-ID): a request reaches Synapse a second time
/// only when it is idempotent and Synapse logged every earlier attempt as
/// cut before its answer left ("200!": the worker was stopped with it in
/// flight), which is when the edge may send it to another member.
fn nothing_repeated_that_synapse_answered(
    deployment: &Deployment,
    judged: &mut std::collections::BTreeSet<String>,
    how: &str,
) {
    let mut attempts: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (id, process, line) in deployment.edge_request_ids() {
        if !judged.contains(&id) {
            attempts.entry(id).or_default().push((process, line));
        }
    }
    let repeated: Vec<_> = attempts.iter().filter(|(_, seen)| seen.len() > 1).collect();
    eprintln!(
        "{how}: {} of the edge's requests in Synapse's access logs, {} of them more than once {:?}",
        attempts.len(),
        repeated.len(),
        repeated.iter().map(|(id, seen)| (id, seen.iter().map(|(p, _)| p).collect::<Vec<_>>())).collect::<Vec<_>>()
    );
    assert!(attempts.len() > 200, "too few of the edge's request IDs in Synapse's logs: {}", attempts.len());
    for (id, seen) in &repeated {
        let method = id.split('-').next().unwrap_or_default();
        let cut = |line: &str| line.split('"').next().is_some_and(|head| head.trim_end().ends_with('!'));
        let answered = seen.iter().filter(|(_, line)| !cut(line)).count();
        assert!(
            ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"].contains(&method) && answered <= 1,
            "{how}: a request reached Synapse again after an answer or without being idempotent: {seen:#?}"
        );
    }
    judged.extend(attempts.into_keys());
}

/// Debian's nginx in front of the same deployment, TLS with the edge's certificate.
struct Nginx {
    address: SocketAddr,
    process: Child,
}

impl Drop for Nginx {
    /// SIGTERM, not SIGKILL: a killed master leaves its worker behind.
    fn drop(&mut self) {
        EdgeProcess::signal(self.process.id(), "TERM");
        let _ = self.process.wait();
    }
}

impl Nginx {
    fn start(table: &Edge, edge_dir: &Path, work: &Path) -> Nginx {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut upstreams = String::new();
        let mut locations = String::new();
        let mut seen = std::collections::BTreeSet::new();
        for pool in table.pools.all() {
            let servers: String = pool.members.iter().map(|m| format!("server {}; ", m.label)).collect();
            upstreams.push_str(&format!("  upstream {} {{ {servers}keepalive 16; }}\n", pool.label));
        }
        for (index, rule) in table.router.rules().iter().enumerate() {
            let group = table.router.serving_group(rule);
            // nginx's locations know no methods: the first rule of a path wins.
            if !table.router.applies(index) || !seen.insert(rule.pattern.to_string()) {
                continue;
            }
            let to = if table.pools.get(group).is_some() { group.name() } else { "main" };
            locations.push_str(&format!("    location ~ \"{}\" {{ proxy_pass http://{to}; }}\n", rule.pattern));
        }
        let certs = edge_dir.join(format!("certs/{HOST}"));
        let config = format!(
            r#"worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log {dir}/nginx.err warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  upstream main {{ server {main}; keepalive 16; }}
{upstreams}  server {{
    listen {address} ssl http2;
    ssl_certificate {cert}; ssl_certificate_key {key};
    client_max_body_size 50M;
    proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Forwarded-Proto https;
    proxy_read_timeout 600s;
{locations}    location / {{ proxy_pass http://main; }}
  }}
}}
"#,
            dir = work.display(),
            main = table.main.address,
            cert = certs.join("fullchain.pem").display(),
            key = certs.join("privkey.pem").display(),
        );
        let path = work.join("nginx.conf");
        std::fs::write(&path, config).unwrap();
        let process = Command::new("nginx")
            .arg("-p")
            .arg(work)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let nginx = Nginx { address, process };
        support::wait_listening(address, "nginx");
        nginx
    }
}

/// How many of each kind of failure, e.g. `{"sync 502": 63}`.
fn tally(failed: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for failure in failed {
        *counts.entry(failure.as_str()).or_default() += 1;
    }
    counts
}

struct RollingOutcome {
    total: usize,
    /// `what status` of each failed request.
    failed: Vec<String>,
    longest: Duration,
}

/// Three users keep a mixed flow going (sync, send, /messages, media
/// download, a login now and then) while every worker is restarted one
/// after another (drained first, or not), then main.
async fn rolling_restart(
    deployment: &mut Deployment,
    edge: &EdgeProcess,
    edge_addr: SocketAddr,
    root_pem: &str,
    drain: bool,
    tag: &str,
) -> RollingOutcome {
    let mut users = Vec::new();
    for i in 0..3 {
        let mut client = Client::new(edge_addr, root_pem, false);
        let name = format!("roller{tag}{i}");
        client.register_and_login(&name, "rolling password").await;
        let (status, room) = client.json(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(json!({}))).await;
        assert_eq!(status, 200, "{room}");
        let upload = client
            .request(reqwest::Method::POST, "/_matrix/media/v3/upload?filename=r.bin")
            .header("Content-Type", "application/octet-stream")
            .body(vec![7u8; 20_000])
            .send()
            .await
            .unwrap();
        assert_eq!(upload.status(), 200);
        let uri = upload.json::<Value>().await.unwrap()["content_uri"].as_str().unwrap().to_string();
        let media = format!("/_matrix/client/v1/media/download/example.com/{}", uri.rsplit('/').next().unwrap());
        users.push((client, name, room["room_id"].as_str().unwrap().to_string(), media));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, u16, Duration)>::new()));
    let mut loops = Vec::new();
    for (client, name, room, media) in users {
        let (stop, outcomes) = (stop.clone(), outcomes.clone());
        loops.push(tokio::spawn(async move {
            let mut since: Option<String> = None;
            let mut round = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                round += 1;
                let sync = match &since {
                    Some(since) => format!("/_matrix/client/v3/sync?timeout=0&since={since}"),
                    None => "/_matrix/client/v3/sync?timeout=0".to_string(),
                };
                let send = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{name}-{round}", encode(&room));
                let messages = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5", encode(&room));
                let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": name}, "password": "rolling password"});
                let mut steps: Vec<(&str, reqwest::Method, String, Option<Value>)> = vec![
                    ("sync", reqwest::Method::GET, sync, None),
                    ("send", reqwest::Method::PUT, send, Some(json!({"msgtype": "m.text", "body": "rolling"}))),
                    ("messages", reqwest::Method::GET, messages, None),
                    ("media", reqwest::Method::GET, media.clone(), None),
                ];
                if round.is_multiple_of(5) {
                    steps.push(("login", reqwest::Method::POST, "/_matrix/client/v3/login".to_string(), Some(login)));
                }
                for (what, method, target, body) in steps {
                    let started = std::time::Instant::now();
                    let mut request = client.request(method, &target);
                    if let Some(body) = body {
                        request = request.json(&body);
                    }
                    let status = match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            if what == "sync" && status == 200 {
                                if let Ok(body) = response.json::<Value>().await {
                                    since = body["next_batch"].as_str().map(str::to_string);
                                }
                            } else {
                                let _ = response.bytes().await;
                            }
                            status
                        }
                        Err(_) => 0,
                    };
                    outcomes.lock().unwrap().push((what.to_string(), status, started.elapsed()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let workers: Vec<(String, String)> = deployment.info["groups"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|members| members.as_array().unwrap().clone())
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["address"].as_str().unwrap().to_string()))
        .collect();
    let workers_cli = |args: &[&str]| {
        let (code, _, stderr) = support::workers_cli(edge, args);
        assert_eq!(code, 0, "workers {args:?}: {stderr}");
    };
    for (name, address) in &workers {
        tokio::task::block_in_place(|| {
            if drain {
                workers_cli(&["drain", address, "--wait", "60s"]);
            }
            deployment.restart(name);
            if drain {
                workers_cli(&["ready", address]);
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::task::block_in_place(|| deployment.restart("main"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in loops {
        task.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap();
    RollingOutcome {
        total: outcomes.len(),
        failed: outcomes
            .iter()
            .filter(|(_, status, _)| *status != 200)
            .map(|(what, status, _)| format!("{what} {status}"))
            .collect(),
        longest: outcomes.iter().map(|(_, _, took)| *took).max().unwrap_or_default(),
    }
}

/// One sync, as a client that keeps up does (`timeout=0` from its `since`).
struct Sync {
    user: usize,
    started: std::time::Instant,
    took: Duration,
    status: u16,
}

/// Twelve users syncing in a loop; one synchrotron is stopped (SIGSTOP) for
/// 15 s. Its users' syncs must go to the other within seconds (the edge
/// finds the stall, cuts their requests and sends them again), and after
/// SIGCONT it takes its users back once its health check and slow start
/// allow.
async fn a_stopped_synchrotron_stalls_no_user(
    deployment: &Deployment,
    table: &Edge,
    edge: &EdgeProcess,
    edge_addr: SocketAddr,
    root_pem: &str,
) {
    const USERS: usize = 12;
    let mut tokens = Vec::new();
    for user in 0..USERS {
        let mut client = Client::new(edge_addr, root_pem, false);
        tokens.push(client.register_and_login(&format!("syncer{user}"), "stall-test password").await);
    }
    // Where each user's syncs go, by the table loaded in-process.
    let pool = table.pools.get(matrix_edge::synapse::table::Group::Synchrotron).unwrap();
    let home = |token: &str| {
        let authorization = format!("Bearer {token}");
        let source = KeySource {
            target: b"/_matrix/client/v3/sync",
            authorization: Some(authorization.as_bytes()),
            client_ip: None,
        };
        let key = sticky::key(matrix_edge::synapse::table::Sticky::User, &source);
        pool.pick(key.as_ref().map(|k| k.as_bytes()), &[]).unwrap()
    };
    let homes: Vec<usize> = tokens.iter().map(|t| home(t)).collect();
    let stopped = (0..pool.members.len()).max_by_key(|m| homes.iter().filter(|h| *h == m).count()).unwrap();
    let stopped_address = pool.members[stopped].upstream.address.to_string();
    let member = deployment.info["groups"]["synchrotron"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["address"] == stopped_address.as_str())
        .unwrap()
        .clone();
    let (name, pid) = (member["name"].as_str().unwrap().to_string(), member["pid"].as_u64().unwrap());
    let its_users = homes.iter().filter(|h| **h == stopped).count();
    assert!(its_users > 0, "no user on either synchrotron?");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let syncs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Sync>::new()));
    let mut loops = Vec::new();
    for (user, token) in tokens.into_iter().enumerate() {
        let (stop, syncs) = (stop.clone(), syncs.clone());
        let mut client = Client::new(edge_addr, root_pem, false);
        client.token = Some(token);
        loops.push(tokio::spawn(async move {
            let mut since: Option<String> = None;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let target = match &since {
                    Some(since) => format!("/_matrix/client/v3/sync?timeout=0&since={since}"),
                    None => "/_matrix/client/v3/sync?timeout=0".to_string(),
                };
                let started = std::time::Instant::now();
                let (status, body) = client.json(reqwest::Method::GET, &target, None).await;
                let took = started.elapsed();
                if let Some(next) = body["next_batch"].as_str() {
                    since = Some(next.to_string());
                }
                syncs.lock().unwrap().push(Sync { user, started, took, status });
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    let signal = |name: &str| {
        let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stopped_at = std::time::Instant::now();
    signal("STOP");
    tokio::time::sleep(Duration::from_secs(15)).await;
    signal("CONT");
    let resumed_at = std::time::Instant::now();
    // The edge's access lines name the worker that answered; requests cut
    // during the stall were answered by the other one, so only new syncs
    // count here.
    let answered_by_it = || {
        let marker = format!("worker={stopped_address} ");
        edge.log_text().lines().filter(|l| l.contains("/sync?") && l.contains(&marker)).count()
    };
    let answered_at_resume = answered_by_it();
    // Health checks (every 5 s) bring it back, then a 10 s slow start.
    let deadline = resumed_at + Duration::from_secs(30);
    let mut back = false;
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if answered_by_it() >= answered_at_resume + 3 {
            back = true;
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in loops {
        task.await.unwrap();
    }
    let syncs = syncs.lock().unwrap();
    let during: Vec<&Sync> = syncs.iter().filter(|s| s.started >= stopped_at && s.started < resumed_at).collect();
    let longest = during.iter().map(|s| s.took).max().unwrap_or_default();
    let (worst_user, _) = during.iter().map(|s| (s.user, s.took)).max_by_key(|(_, t)| *t).unwrap_or_default();
    eprintln!(
        "{name} stopped 15 s with {its_users} of {USERS} users: {} syncs during the stall, longest {longest:?} \
         (user {worst_user}, home {})",
        during.len(),
        if homes[worst_user] == stopped { "the stopped one" } else { "the other" },
    );
    assert!(syncs.iter().all(|s| s.status == 200), "a sync failed");
    assert!(during.len() > USERS * 5, "too few syncs during the stall: {}", during.len());
    assert!(longest <= Duration::from_secs(5), "a user waited {longest:?} for a sync during the stall");
    let log = edge.log_text();
    assert!(log.contains("stalled: taken out"), "the edge never took the stopped synchrotron out:\n{log}");
    assert!(back, "{name} served nothing new within 30 s of SIGCONT");
}

fn worker_for_origin(table: &Edge) -> String {
    let pool = table.pools.get(matrix_edge::synapse::table::Group::FederationInbound).unwrap();
    let index = pool.pick(Some(b"remote.example"), &[]).unwrap();
    pool.members[index].upstream.address.to_string()
}
