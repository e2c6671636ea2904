//! Route selection over the full built-in table (every worker type
//! declared), on the request lines of tests/routing/requests.txt.
//! `cargo bench --bench routing`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
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

criterion_group!(benches, route_selection);
criterion_main!(benches);
