//! The edge's canonical JSON encoder against Python's `canonicaljson` (the
//! one Synapse signs and verifies with), from the test virtualenv: on the
//! fuzz seeds and a generated corpus, every value the edge encodes must come
//! out byte for byte as Python writes it, and the only values it declines
//! are the ones it says it declines (floats, integers beyond ±2^53).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

use crate::support;

use matrix_edge::federation::canonical::encode;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use support::matrix::synapse_python;

/// Strings chosen for the escapes and orderings an encoder can get wrong.
const AWKWARD: &[&str] = &[
    "",
    "plain",
    "quote \" backslash \\ slash /",
    "\u{0}\u{1}\u{8}\u{9}\u{a}\u{b}\u{c}\u{d}\u{1f}",
    "\u{7f}\u{80}\u{9f}\u{a0}",
    "\u{2028}\u{2029}",
    "é ß Ω",
    "日本語",
    "😀 𝄞",
    "\u{fffd}\u{feff}",
    "<script>&'",
];

fn corpus() -> Vec<Value> {
    let mut values: Vec<Value> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/canonical_json"))
        .unwrap()
        .filter_map(|entry| serde_json::from_slice(&std::fs::read(entry.unwrap().path()).unwrap()).ok())
        .collect();
    for text in AWKWARD {
        values.push(json!(text));
        values.push(json!({ *text: text, "a": [text] }));
    }
    let mut keys = serde_json::Map::new();
    for text in AWKWARD {
        keys.insert(text.to_string(), json!(text.len()));
        keys.insert(text.to_uppercase(), Value::Null);
    }
    values.push(Value::Object(keys));
    for number in [0i64, 1, -1, 10, 255, 256, 65535, 1 << 31, -(1 << 31), 1 << 40, (1 << 53) - 1, -((1 << 53) - 1)] {
        values.push(json!(number));
        values.push(json!({ "n": number, "list": [number, -number] }));
    }
    values.push(json!(1u64 << 53));
    values.push(json!(-(1i64 << 53)));
    values.push(json!(u64::MAX));
    values.push(json!(0.5));
    values.push(json!({"deep": {"float": [1, 2, 3.25]}}));
    // A transaction as Synapse sends one.
    values.push(json!({
        "origin": "example.org", "origin_server_ts": 1_767_225_600_000u64,
        "pdus": [{"type": "m.room.message", "room_id": "!r:example.org", "sender": "@a:example.org",
                  "content": {"msgtype": "m.text", "body": "héllo 😀\n"}, "depth": 12,
                  "prev_events": ["$e1", "$e2"], "auth_events": [],
                  "hashes": {"sha256": "abc"}, "signatures": {"example.org": {"ed25519:a": "sig"}}}],
        "edus": [{"edu_type": "m.typing", "content": {"room_id": "!r:example.org", "typing": true}}]
    }));
    values
}

/// What Python's canonicaljson writes for each value, hex-encoded, one per line.
fn python_encodings(values: &[Value]) -> Vec<String> {
    let script = "import sys, json, canonicaljson\n\
                  for line in sys.stdin:\n\
                  \x20   print(canonicaljson.encode_canonical_json(json.loads(line)).hex(), flush=True)\n";
    let mut child = Command::new(synapse_python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = String::new();
    for value in values {
        input.push_str(&serde_json::to_string(value).unwrap());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "python canonicaljson failed");
    String::from_utf8(output.stdout).unwrap().lines().map(str::to_string).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn has_float_or_large_integer(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.as_i64().is_none_or(|n| n.unsigned_abs() > (1 << 53) - 1),
        Value::Array(items) => items.iter().any(has_float_or_large_integer),
        Value::Object(members) => members.values().any(has_float_or_large_integer),
        _ => false,
    }
}

#[test]
#[ignore = "needs Synapse's virtualenv (canonicaljson): run scripts/test"]
fn the_encoder_writes_what_python_canonicaljson_writes() {
    let values = corpus();
    let python = python_encodings(&values);
    assert_eq!(python.len(), values.len());
    let mut compared = 0;
    for (value, expected) in values.iter().zip(&python) {
        match encode(value) {
            Ok(ours) => {
                assert_eq!(&hex(&ours), expected, "differs from Python for {value}");
                compared += 1;
            }
            Err(reason) => assert!(
                has_float_or_large_integer(value),
                "declined {value} ({}) though it holds no float or large integer",
                reason.reason()
            ),
        }
    }
    assert!(compared >= 50, "only {compared} values compared");
}
