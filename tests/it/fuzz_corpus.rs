//! Replays the fuzz seed corpus (fuzz/corpus/TARGET/*) through the same entry
//! points the cargo-fuzz targets call, so every seed and every crash input
//! once fixed keeps passing on stable Rust in the ordinary test run.
#![allow(clippy::unwrap_used)]

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panics", path.display());
        count += 1;
    }
    assert!(count >= 5, "{target}: only {count} seeds in {}", dir.display());
}

#[test]
fn router_seeds() {
    replay("router", matrix_edge::fuzzing::router);
}

#[test]
fn sticky_key_seeds() {
    replay("sticky_keys", matrix_edge::fuzzing::sticky_keys);
}

#[test]
fn config_seeds() {
    replay("config", matrix_edge::fuzzing::config);
}

#[test]
fn proxy_header_seeds() {
    replay("proxy_header", matrix_edge::fuzzing::proxy_header);
}

#[test]
fn x_matrix_seeds() {
    replay("x_matrix", matrix_edge::fuzzing::x_matrix);
}

#[test]
fn canonical_json_seeds() {
    replay("canonical_json", matrix_edge::fuzzing::canonical_json);
}
