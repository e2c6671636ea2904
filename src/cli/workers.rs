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
    let mut last = None;
    loop {
        let current: Vec<MemberView> =
            members(&ask(socket, "list")?)?.into_iter().filter(|m| m.address == address).collect();
        let busy: u32 = current.iter().map(|m| m.in_flight + m.long_polls).sum();
        if last != Some(busy) {
            println!("{address}: {busy} requests in flight");
            last = Some(busy);
        }
        if busy == 0 {
            out.push_str(&format!("{address}: nothing in flight after {:.1} s\n", started.elapsed().as_secs_f64()));
            return Ok(out);
        }
        if started.elapsed() >= limit {
            return Err(edge(format!("{address} still has {busy} requests in flight after {limit:?}")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
