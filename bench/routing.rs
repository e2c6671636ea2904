//! Route selection over the full built-in table (every worker type
//! declared), on the request lines of tests/routing/requests.txt, and the
//! site choice in front of it among 20 sites.
//! `cargo bench --bench routing`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use matrix_edge::config::{Role, Source};
use matrix_edge::edge::Edge;
use matrix_edge::synapse::table::{Group, Router};

fn requests() -> Vec<(String, String)> {
    include_str!("../tests/routing/requests.txt")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let request = l.split(" => ").next()?.split(" | ").next()?;
            let (method, target) = request.split_once(' ')?;
            Some((method.to_string(), target.to_string()))
        })
        .collect()
}

fn route_selection(c: &mut Criterion) {
    let Ok(router) = Router::new(Vec::new(), &Group::ALL) else { return };
    let requests = requests();
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(requests.len() as u64));
    group.bench_function("compiled table, all request lines", |b| {
        b.iter(|| {
            for (method, target) in &requests {
                black_box(router.route(black_box(method), black_box(target.as_bytes())));
            }
        })
    });
    group.bench_function("first-match scan, all request lines", |b| {
        b.iter(|| {
            for (method, target) in &requests {
                black_box(router.route_naive(black_box(method), black_box(target.as_bytes())));
            }
        })
    });
    group.finish();
}

/// An edge with the Matrix site and 20 more, each with a few routes.
fn twenty_sites() -> Result<Edge, String> {
    let mut text = String::from(
        "server_name: example.com\nlisteners:\n  - { address: \"127.0.0.1:8448\", serves: [well_known, client, federation, sites] }\nsynapse:\n  main: 127.0.0.1:8008\nupstreams:\n  app: { address: 127.0.0.1:9000 }\nsites:\n",
    );
    for site in 0..20 {
        let host =
            if site % 4 == 0 { format!("\"*.wild{site}.example.org\"") } else { format!("site{site}.example.org") };
        text.push_str(&format!(
            "  - hosts: [{host}]\n    routes:\n      - {{ path: /healthz, upstream: app }}\n      - {{ prefix: /api/, upstream: app }}\n      - {{ prefix: /, redirect: {{ to: \"https://example.org\" }} }}\n"
        ));
    }
    let source = Source { file: "bench.yaml".into(), text };
    let config = source.parse().map_err(|e| e.to_string())?;
    Edge::from_config(config, &source).map_err(|e| e.to_string())
}

fn site_selection(c: &mut Criterion) {
    let edge = match twenty_sites() {
        Ok(edge) => edge,
        Err(error) => panic!("the 20-site bench config is refused: {error}"),
    };
    let roles = [Role::WellKnown, Role::Client, Role::Federation, Role::Sites];
    let mut hosts: Vec<String> =
        (0..20)
            .map(|site| {
                if site % 4 == 0 {
                    format!("a.wild{site}.example.org")
                } else {
                    format!("Site{site}.example.org:443")
                }
            })
            .collect();
    hosts.push("example.com".into());
    let paths = ["/api/v1/things?x=1", "/healthz", "/index.html", "/_matrix/client/v3/sync"];
    let mut group = c.benchmark_group("site");
    group.throughput(Throughput::Elements((hosts.len() * paths.len()) as u64));
    group.bench_function("host and route among 20 sites", |b| {
        b.iter(|| {
            for host in &hosts {
                for path in paths {
                    let (site, _) =
                        edge.sites.target(&roles, Some(black_box(host.as_bytes())), black_box(path.as_bytes()));
                    black_box(site);
                }
            }
        })
    });
    group.finish();
}

/// One federation request's signature check: OpenSSL's ed25519 (lenient:
/// any key) against ed25519-dalek's strict verification (what the gate
/// uses), on a signed transaction-sized message.
fn signature_verification(c: &mut Criterion) {
    use matrix_edge::federation::signing::{decode_unpadded, encode_unpadded, public_key, sign, verifies};
    let Ok(private) = openssl::pkey::PKey::generate_ed25519() else { return };
    let message = vec![b'x'; 2048];
    let (Ok(raw), Ok(signature)) = (private.raw_public_key(), sign(&private, &message)) else { return };
    let Some(Ok(strict)) = public_key(&encode_unpadded(&raw)) else { return };
    let (Ok(lenient), Some(signature_bytes)) =
        (openssl::pkey::PKey::public_key_from_raw_bytes(&raw, openssl::pkey::Id::ED25519), decode_unpadded(&signature))
    else {
        return;
    };
    let mut group = c.benchmark_group("ed25519_verify");
    group.bench_function("openssl", |b| {
        b.iter(|| {
            openssl::sign::Verifier::new_without_digest(&lenient)
                .and_then(|mut verifier| verifier.verify_oneshot(black_box(&signature_bytes), black_box(&message)))
                .unwrap_or(false)
        })
    });
    group.bench_function("dalek_strict", |b| b.iter(|| verifies(&strict, black_box(&signature), black_box(&message))));
    group.finish();
}

/// A /sync-shaped answer: rooms of timeline events with random IDs (the
/// part no coding shrinks), senders, timestamps and message text from a
/// vocabulary; deterministic.
fn sync_body(events: usize) -> Vec<u8> {
    const WORDS: [&str; 24] = [
        "the", "meeting", "is", "at", "noon", "can", "you", "send", "me", "link", "thanks", "see", "deploy", "synapse",
        "worker", "restart", "ok", "done", "lunch", "tomorrow", "matrix", "room", "call", "later",
    ];
    const ID: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut rooms = Vec::new();
    for room in 0..events / 50 {
        let mut timeline = Vec::new();
        for _ in 0..50 {
            let id: String = (0..43).map(|_| ID[(next() % 64) as usize] as char).collect();
            let text: Vec<&str> = (0..(4 + next() % 20)).map(|_| WORDS[(next() % 24) as usize]).collect();
            timeline.push(format!(
                r#"{{"content":{{"body":"{}","msgtype":"m.text"}},"event_id":"${id}","origin_server_ts":{},"sender":"@user{}:example.org","type":"m.room.message","unsigned":{{"age":{}}}}}"#,
                text.join(" "),
                1_700_000_000_000u64 + next() % 1_000_000_000,
                next() % 500,
                next() % 100_000
            ));
        }
        rooms.push(format!(
            r#""!room{room}:example.org":{{"timeline":{{"events":[{}],"limited":true,"prev_batch":"t{room}_1_2_3"}},"state":{{"events":[]}},"unread_notifications":{{"highlight_count":0,"notification_count":{}}}}}"#,
            timeline.join(","),
            next() % 50
        ));
    }
    format!(r#"{{"next_batch":"s1_2_3_4","rooms":{{"join":{{{}}}}}}}"#, rooms.join(",")).into_bytes()
}

/// Each coding and level the edge might use, on a 2 MB sync-shaped answer:
/// time per byte here, the size each gives printed once.
fn compression_levels(c: &mut Criterion) {
    use pingora::protocols::http::compression::Algorithm;
    let body = sync_body(10_000);
    let mut group = c.benchmark_group("compress_sync");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.sample_size(10);
    for (algorithm, name, levels) in [
        (Algorithm::Gzip, "gzip", &[1u32, 3, 5, 6, 9][..]),
        (Algorithm::Brotli, "brotli", &[1, 3, 4, 5, 6][..]),
        (Algorithm::Zstd, "zstd", &[1, 3, 6, 9][..]),
    ] {
        for &level in levels {
            let compress = || {
                let mut encoder = algorithm.compressor(level)?;
                // As the edge streams it: 16 KiB at a time.
                let mut out = 0;
                for (at, chunk) in body.chunks(16 << 10).enumerate() {
                    out += encoder.encode(chunk, (at + 1) * (16 << 10) >= body.len()).ok()?.len();
                }
                Some(out)
            };
            eprintln!("{name} {level}: {} of {} bytes", compress().unwrap_or(0), body.len());
            group.bench_function(format!("{name}_{level}"), |b| b.iter(compress));
        }
    }
    group.finish();
}

criterion_group!(benches, route_selection, site_selection, signature_verification, compression_levels);
criterion_main!(benches);
