//! `matrix-edge workers`: the running edge's pool members through its
//! control socket (`services::control`), and draining, maintenance and
//! ready on command.

use crate::cli::{edge, CliError};
use crate::services::control::MemberView;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// One request to the control socket, its JSON answer.
fn ask(socket: &Path, line: &str) -> Result<serde_json::Value, CliError> {
    let unreachable = |e: std::io::Error| {
        edge(format!(
            "cannot reach the running edge at {} ({e}): is it running, and are you its user?",
            socket.display()
        ))
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(unreachable)?;
    stream.write_all(format!("{line}\n").as_bytes()).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(unreachable)?;
    let value: serde_json::Value =
        serde_json::from_str(&answer).map_err(|e| edge(format!("the edge's answer is not JSON ({e}): {answer:?}")))?;
    match value["error"].as_str() {
        Some(error) => Err(edge(error.to_string())),
        None => Ok(value),
    }
}

fn members(value: &serde_json::Value) -> Result<Vec<MemberView>, CliError> {
    serde_json::from_value(value["members"].clone()).map_err(|e| edge(format!("unexpected answer from the edge: {e}")))
}

pub fn render(members: &[MemberView]) -> String {
    let mut out = format!(
        "{:<9} {:<26} {:<40} {:<12} {:>9} {:>10} {:>8} {:>8} {:>9}\n",
        "kind", "pool", "address", "state", "in_flight", "long_polls", "req/s", "errors", "p99"
    );
    for m in members {
        let p99 = m.p99_ms.map_or("-".to_string(), |ms| format!("<={ms}ms"));
        out.push_str(&format!(
            "{:<9} {:<26} {:<40} {:<12} {:>9} {:>10} {:>8.2} {:>8} {:>9}\n",
            m.kind, m.pool, m.address, m.state, m.in_flight, m.long_polls, m.per_second, m.errors, p99
        ));
    }
    out
}

/// With a cluster: what the other edges heard from still hold on
/// `address`, and those that have not yet said so since `typed_ms`
/// (silent ones and those without the member are not waited for).
fn held_elsewhere(answer: &serde_json::Value, address: &str, typed_ms: i64) -> (u32, Vec<String>) {
    let own = answer["edge"].as_str();
    let (mut busy, mut waiting_on) = (0, Vec::new());
    for edge in answer["edges"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let name = edge["name"].as_str().unwrap_or("?");
        let has_member = edge["members"].as_array().is_some_and(|members| members.iter().any(|m| m == address));
        if Some(name) == own || edge["silent"] == true || !has_member {
            continue;
        }
        match edge["held"][address].as_u64() {
            Some(held) if edge["at"].as_i64().is_some_and(|at| at > typed_ms) => busy += held as u32,
            _ => waiting_on.push(name.to_string()),
        }
    }
    (busy, waiting_on)
}

pub fn list(socket: &Path) -> Result<String, CliError> {
    let answer = ask(socket, "list")?;
    let mut out = render(&members(&answer)?);
    let edges = answer["edges"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !edges.is_empty() {
        out.push_str(&format!("\n{:<24} {:<10} {:<14} {:>12}  {}\n", "edge", "version", "config", "heard", "notes"));
        for edge in edges {
            let mut notes = Vec::new();
            if edge["config_drift"] == true {
                notes.push("config differs from this edge's".to_string());
            }
            if edge["silent"] == true {
                notes.push("not heard from".to_string());
            }
            if let Some(error) = edge["reload_error"].as_str() {
                notes.push(format!("last reload failed: {error}"));
            }
            let heard = format!("{:.1} s ago", edge["heard_ms_ago"].as_f64().unwrap_or(0.0) / 1000.0);
            out.push_str(&format!(
                "{:<24} {:<10} {:<14} {:>12}  {}\n",
                edge["name"].as_str().unwrap_or("?"),
                edge["version"].as_str().unwrap_or("?"),
                edge["config"].as_str().unwrap_or("?"),
                heard,
                notes.join("; ")
            ));
        }
    }
    Ok(out)
}

/// Sets a member's state; with `wait` (draining or maintenance), returns
/// once nothing is in flight on it any more, printing the count as it falls.
pub fn set(socket: &Path, state: &str, address: &str, wait: Option<Duration>) -> Result<String, CliError> {
    let answer = ask(socket, &format!("set {state} {address}"))?;
    let mut out = render(&members(&answer)?);
    let Some(limit) = wait else { return Ok(out) };
    let started = Instant::now();
    let typed_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut last = None;
    loop {
        let answer = ask(socket, "list")?;
        let current: Vec<MemberView> = members(&answer)?.into_iter().filter(|m| m.address == address).collect();
        let (elsewhere, waiting_on) = held_elsewhere(&answer, address, typed_ms);
        let busy: u32 = current.iter().map(|m| m.in_flight + m.long_polls).sum::<u32>() + elsewhere;
        let report = (busy, waiting_on.clone());
        if last.as_ref() != Some(&report) {
            match waiting_on.is_empty() {
                true => println!("{address}: {busy} requests in flight"),
                false => {
                    println!("{address}: {busy} requests in flight; waiting to hear from {}", waiting_on.join(", "))
                }
            }
            last = Some(report);
        }
        if busy == 0 && waiting_on.is_empty() {
            let edges = if answer["edge"].is_string() { " on every edge" } else { "" };
            out.push_str(&format!(
                "{address}: nothing in flight{edges} after {:.1} s\n",
                started.elapsed().as_secs_f64()
            ));
            return Ok(out);
        }
        if started.elapsed() >= limit {
            return Err(edge(format!("{address} still has {busy} requests in flight after {limit:?}")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::held_elsewhere;
    use serde_json::json;

    #[test]
    fn a_drain_waits_for_every_other_edge_that_has_the_member() {
        let w = "10.0.0.1:8083";
        let answer = |b_at: i64, b_held: serde_json::Value| {
            json!({
                "edge": "a",
                "edges": [
                    { "name": "a", "at": 5000, "silent": false, "members": [w], "held": {} },
                    { "name": "b", "at": b_at, "silent": false, "members": [w], "held": b_held },
                    { "name": "c", "at": 5000, "silent": true, "members": [w], "held": {} },
                    { "name": "d", "at": 5000, "silent": false, "members": ["10.0.0.2:8083"], "held": {} },
                ]
            })
        };
        // B has not heard of the drain yet (an old heartbeat, or none held).
        assert_eq!(held_elsewhere(&answer(900, json!({ w: 0 })), w, 1000), (0, vec!["b".to_string()]));
        assert_eq!(held_elsewhere(&answer(2000, json!({})), w, 1000), (0, vec!["b".to_string()]));
        // B applied it and still holds two; then none.
        assert_eq!(held_elsewhere(&answer(2000, json!({ w: 2 })), w, 1000), (2, vec![]));
        assert_eq!(held_elsewhere(&answer(3000, json!({ w: 0 })), w, 1000), (0, vec![]));
        // Without a cluster there is nobody else.
        assert_eq!(held_elsewhere(&json!({ "members": [] }), w, 1000), (0, vec![]));
    }
}
