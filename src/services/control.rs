//! The control socket: a Unix socket (mode 0600, so only the service's user
//! and root may use it; never a network port) where `matrix-edge workers`
//! lists pool members and drains them, puts them in maintenance, or makes
//! them ready again. One request line, one JSON answer, then the
//! connection closes:
//!
//! - `list`
//! - `set ready|drain|maintenance ADDRESS`

use crate::edge::Edge;
use crate::upstream::pool::Pool;
use crate::upstream::state::{now_ms, Admin};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub struct ControlSocket {
    pub path: PathBuf,
    pub edge: Arc<ArcSwap<Edge>>,
    pub runtime: Arc<crate::runtime::Runtime>,
}

/// One member as `workers list` shows it.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct MemberView {
    /// `group` or `upstream`.
    pub kind: String,
    pub pool: String,
    pub address: String,
    /// `up`, `down`, `ejected`, `draining` or `maintenance`.
    pub state: String,
    pub in_flight: u32,
    pub long_polls: u32,
    /// Over the last minute: requests per second, errors, p99 (ms, a bucket's bound).
    #[serde(default)]
    pub per_second: f64,
    #[serde(default)]
    pub errors: u64,
    #[serde(default)]
    pub p99_ms: Option<u32>,
}

/// Every pool of a snapshot, Synapse's groups first.
pub fn pools(edge: &Edge) -> impl Iterator<Item = (&'static str, &Pool)> {
    let named = edge.upstreams.all().iter().map(|upstream| ("upstream", &upstream.pool));
    edge.pools.all().iter().map(|pool| ("group", pool)).chain(named)
}

/// A member's state in one word, the operator's choice first.
pub fn state_word(pool: &Pool, index: usize, now: u64) -> &'static str {
    let state = &pool.members[index].state;
    match state.admin() {
        Admin::Draining => "draining",
        Admin::Maintenance => "maintenance",
        Admin::Ready if !state.is_healthy() => "down",
        Admin::Ready if state.is_ejected(now) => "ejected",
        Admin::Ready if state.ramp_permille(pool.balancing.slow_start, now) < 1000 => "slow_start",
        Admin::Ready => "up",
    }
}

pub fn list(edge: &Edge) -> Vec<MemberView> {
    let now = now_ms();
    let second = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut members = Vec::new();
    for (kind, pool) in pools(edge) {
        for (index, member) in pool.members.iter().enumerate() {
            let minute = member.state.last_minute.summary(second);
            members.push(MemberView {
                kind: kind.to_string(),
                pool: pool.label.clone(),
                address: member.label.clone(),
                state: state_word(pool, index, now).to_string(),
                in_flight: member.state.in_flight(),
                long_polls: member.state.long_polls(),
                per_second: minute.per_second,
                errors: minute.errors,
                p99_ms: minute.p99_ms,
            });
        }
    }
    members
}

/// The answer to one request line; a state set is queued for the other
/// edges too when they share one (`cluster`).
pub fn answer(edge: &Edge, shared: &crate::upstream::shared_admin::SharedAdmin, line: &str) -> serde_json::Value {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["list"] => serde_json::json!({
            "members": list(edge),
            "edge": edge.ops.config.cluster.as_ref().map(|c| crate::services::cluster::edge_name(c.name.as_deref())),
            "edges": crate::services::status::fleet_json(&shared.view().fleet),
        }),
        ["set", word, address] => {
            let Some(admin) = Admin::parse(word) else {
                return serde_json::json!({ "error": format!("unknown state {word:?}: ready, drain or maintenance") });
            };
            let changed: usize = pools(edge).map(|(_, pool)| pool.set_admin(address, admin)).sum();
            if changed == 0 {
                return serde_json::json!({ "error": format!("no worker or upstream member at {address}") });
            }
            let members: Vec<MemberView> = list(edge).into_iter().filter(|m| m.address == *address).collect();
            let cluster = edge.ops.config.cluster.is_some();
            if cluster {
                shared.queue(address, admin);
            }
            serde_json::json!({ "changed": changed, "members": members, "shared": cluster })
        }
        _ => {
            serde_json::json!({ "error": format!("unknown request {line:?}: list, or set ready|drain|maintenance ADDRESS") })
        }
    }
}

#[async_trait]
impl BackgroundService for ControlSocket {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // A socket left by an instance that is gone (or that hands over to
        // this one in an upgrade) is replaced: the newest instance answers.
        let _ = std::fs::remove_file(&self.path);
        let listener = match tokio::net::UnixListener::bind(&self.path) {
            Ok(listener) => listener,
            Err(e) => {
                log::warn!(
                    "control socket {} not available ({e}): `matrix-edge workers` cannot reach this instance",
                    self.path.display()
                );
                return;
            }
        };
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600)) {
            log::warn!("control socket {}: cannot restrict it to its owner ({e}); closing it", self.path.display());
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let edge = self.edge.load_full();
                    let runtime = Arc::clone(&self.runtime);
                    tokio::spawn(async move {
                        let (reader, mut writer) = stream.into_split();
                        let mut line = String::new();
                        let mut reader = BufReader::new(reader.take(4096));
                        let read = reader.read_line(&mut line);
                        if !matches!(tokio::time::timeout(Duration::from_secs(5), read).await, Ok(Ok(_))) {
                            return;
                        }
                        let mut body = answer(&edge, &runtime.shared_admin, line.trim()).to_string();
                        body.push('\n');
                        let _ = writer.write_all(body.as_bytes()).await;
                    });
                }
                _ = shutdown.changed() => {
                    // Only our own socket: an upgraded instance may have replaced it.
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Source;

    fn edge() -> Edge {
        let text = r#"server_name: example.com
listeners: [{ address: "127.0.0.1:8443", serves: [client] }]
synapse:
  main: 127.0.0.1:8008
  workers:
    synchrotron: [127.0.0.1:8083, 127.0.0.1:8084]
"#;
        let source = Source { file: "inline.yaml".into(), text: text.to_string() };
        Edge::from_config(source.parse().unwrap(), &source).unwrap()
    }

    #[test]
    fn drain_and_ready_change_one_member_and_list_shows_it() {
        let edge = edge();
        let shared = crate::upstream::shared_admin::SharedAdmin::default();
        let drained = answer(&edge, &shared, "set drain 127.0.0.1:8084");
        assert_eq!(drained["changed"], 1, "{drained}");
        assert_eq!(drained["members"][0]["state"], "draining");
        let listed = answer(&edge, &shared, "list");
        let states: Vec<&str> =
            listed["members"].as_array().unwrap().iter().map(|m| m["state"].as_str().unwrap()).collect();
        assert_eq!(states, ["up", "draining"]);
        let pool = edge.pools.all().first().unwrap();
        assert!((0..50).all(|_| pool.pick(None, &[]) == Some(0)), "a draining member got a request");
        assert_eq!(answer(&edge, &shared, "set ready 127.0.0.1:8084")["members"][0]["state"], "slow_start");
        assert!(answer(&edge, &shared, "set drain 127.0.0.1:9999")["error"].as_str().unwrap().contains("no worker"));
        assert!(!shared.has_pending(), "without cluster nothing is queued for other edges");
        assert!(answer(&edge, &shared, "set sleep 127.0.0.1:8084")["error"]
            .as_str()
            .unwrap()
            .contains("unknown state"));
        assert!(answer(&edge, &shared, "reboot")["error"].is_string());
    }
}
