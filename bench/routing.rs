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

criterion_group!(benches, route_selection, site_selection, signature_verification);
criterion_main!(benches);
