//! Operators' drains, maintenance and ready, shared by every edge of a
//! cluster: the records kept in Redis (one hash field per member address,
//! absent when ready) and what this edge knows of them. The Redis I/O and
//! the applying are `services::cluster`'s; this part is pure.
//!
//! A record is JSON, `{"state":"drain","edge":"a","at":1796680597}`, so a
//! newer edge can add fields an older one ignores; one it cannot read (a
//! newer state, garbage) is skipped with a log line and never applied.

use crate::upstream::state::Admin;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// One member's record: who set what, when (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub state: String,
    pub edge: String,
    pub at: i64,
}

impl Record {
    pub fn new(admin: Admin, edge: &str, at: i64) -> Option<Record> {
        let state = match admin {
            Admin::Ready => return None,
            Admin::Draining => "drain",
            Admin::Maintenance => "maintenance",
        };
        Some(Record { state: state.into(), edge: edge.into(), at })
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A record read back: what to apply, or why it was skipped.
pub fn decode(text: &str) -> Result<(Admin, Record), String> {
    let record: Record = serde_json::from_str(text).map_err(|e| format!("not a record ({e})"))?;
    match Admin::parse(&record.state) {
        Some(Admin::Ready) | None => Err(format!("state {:?} is not drain or maintenance", record.state)),
        Some(admin) => Ok((admin, record)),
    }
}

/// Good records by member address.
pub type Records = BTreeMap<String, (Admin, Record)>;
/// Unreadable records' addresses, each with the reason.
pub type Skipped = Vec<(String, String)>;

/// Every record in the hash, decoded.
pub fn decode_all(fields: &BTreeMap<String, String>) -> (Records, Skipped) {
    let mut good = BTreeMap::new();
    let mut skipped = Vec::new();
    for (address, text) in fields {
        match decode(text) {
            Ok(decoded) => {
                good.insert(address.clone(), decoded);
            }
            Err(why) => skipped.push((address.clone(), why)),
        }
    }
    (good, skipped)
}

/// One edge's heartbeat, written every second to `PREFIX:edges`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Beat {
    pub name: String,
    pub version: String,
    /// The first 12 hex digits of the SHA-256 of its config file's text.
    pub config: String,
    pub listeners: Vec<String>,
    /// Unix seconds.
    pub started: i64,
    /// The last reload: when (Unix seconds) and its error, if it failed.
    pub reloaded: Option<i64>,
    pub reload_error: Option<String>,
    /// When it wrote this, Unix milliseconds.
    pub at: i64,
    /// Every member it has, by address.
    #[serde(default)]
    pub members: Vec<String>,
    /// Its members in drain or maintenance, with the requests they still
    /// hold there (what `workers drain --wait` waits for on every edge).
    #[serde(default)]
    pub held: BTreeMap<String, u32>,
}

/// An edge as another sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetRow {
    pub beat: Beat,
    /// Its config differs from the reader's.
    pub drift: bool,
    /// Not heard from for `SILENT_AFTER_MS`.
    pub silent: bool,
}

/// An edge not heard from for this long is flagged.
pub const SILENT_AFTER_MS: i64 = 5_000;
/// An edge not heard from for this long is removed from the fleet.
pub const FORGOTTEN_AFTER_MS: i64 = 600_000;

/// The fleet from the heartbeats read, by name; the reader's own config
/// digest marks drift. Returns the rows and the names to forget.
pub fn fleet(fields: &BTreeMap<String, String>, own_config: &str, now_ms: i64) -> (Vec<FleetRow>, Vec<String>) {
    let mut rows = Vec::new();
    let mut forget = Vec::new();
    for (name, text) in fields {
        let Ok(beat) = serde_json::from_str::<Beat>(text) else {
            forget.push(name.clone());
            continue;
        };
        let age = now_ms - beat.at;
        if age > FORGOTTEN_AFTER_MS {
            forget.push(name.clone());
            continue;
        }
        rows.push(FleetRow { drift: beat.config != own_config, silent: age > SILENT_AFTER_MS, beat });
    }
    (rows, forget)
}

/// What the status page shows of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// `None` until the first attempt.
    pub reachable: Option<bool>,
    pub last_error: Option<String>,
    /// Records applied to members of this edge.
    pub applied: Vec<(String, Record)>,
    /// Records for addresses no pool of this edge has.
    pub unknown: Vec<(String, Record)>,
    pub skipped: Vec<String>,
    /// Every edge heard from, this one included.
    pub fleet: Vec<FleetRow>,
}

/// This edge's side of the shared records; lives in the runtime.
#[derive(Default)]
pub struct SharedAdmin {
    /// Operators' changes made here, waiting to be written (kept while
    /// Redis is unreachable, so a drain typed then is shared once it is back
    /// and is not undone by the records read before it).
    pending: Mutex<Vec<(String, Admin)>>,
    view: Mutex<ClusterView>,
}

impl SharedAdmin {
    pub fn queue(&self, address: &str, admin: Admin) {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pending.retain(|(queued, _)| queued != address);
        pending.push((address.to_string(), admin));
    }

    /// The changes to write, oldest first; put back with `requeue` if the write fails.
    pub fn take_pending(&self) -> Vec<(String, Admin)> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    pub fn requeue(&self, changes: Vec<(String, Admin)>) {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Changes made since the failed write are newer: they win.
        for (address, admin) in changes.into_iter().rev() {
            if !pending.iter().any(|(queued, _)| *queued == address) {
                pending.insert(0, (address, admin));
            }
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_empty()
    }

    pub fn view(&self) -> ClusterView {
        self.view.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub fn update_view(&self, change: impl FnOnce(&mut ClusterView)) {
        change(&mut self.view.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_ready_has_none() {
        let record = Record::new(Admin::Draining, "edge-a", 1_796_680_597).unwrap();
        assert_eq!(record.encode(), r#"{"state":"drain","edge":"edge-a","at":1796680597}"#);
        assert_eq!(decode(&record.encode()), Ok((Admin::Draining, record)));
        let maintenance = Record::new(Admin::Maintenance, "b", 1).unwrap();
        assert_eq!(decode(&maintenance.encode()).map(|(admin, _)| admin), Ok(Admin::Maintenance));
        assert_eq!(Record::new(Admin::Ready, "a", 1), None);
    }

    #[test]
    fn unreadable_records_are_skipped_with_a_reason() {
        let mut fields = BTreeMap::new();
        fields.insert("127.0.0.1:8081".to_string(), Record::new(Admin::Draining, "a", 1).unwrap().encode());
        fields.insert("127.0.0.1:8082".to_string(), "\u{1}garbage".to_string());
        fields.insert("127.0.0.1:8083".to_string(), r#"{"state":"hibernate","edge":"z","at":2}"#.to_string());
        fields.insert(
            "127.0.0.1:8084".to_string(),
            r#"{"state":"maintenance","edge":"z","at":2,"reason":"newer field"}"#.to_string(),
        );
        let (good, skipped) = decode_all(&fields);
        assert_eq!(good.keys().collect::<Vec<_>>(), ["127.0.0.1:8081", "127.0.0.1:8084"]);
        assert_eq!(skipped.len(), 2);
        assert_eq!(skipped[0].0, "127.0.0.1:8082");
        assert!(skipped[0].1.starts_with("not a record"), "{skipped:?}");
        assert!(skipped[1].1.contains("\"hibernate\" is not drain or maintenance"), "{skipped:?}");
    }

    #[test]
    fn the_fleet_flags_config_drift_and_silence_and_forgets_the_long_gone() {
        let beat = |name: &str, config: &str, at: i64| {
            let beat = Beat {
                name: name.into(),
                version: "0.1.0".into(),
                config: config.into(),
                listeners: vec!["[::]:443".into()],
                started: 1,
                reloaded: None,
                reload_error: None,
                at,
                members: Vec::new(),
                held: BTreeMap::new(),
            };
            (name.to_string(), serde_json::to_string(&beat).unwrap())
        };
        let now = 1_000_000_000;
        let fields: BTreeMap<String, String> = [
            beat("a", "abc", now - 100),
            beat("b", "def", now - 1_000),
            beat("c", "abc", now - 6_000),
            beat("d", "abc", now - 700_000),
            ("e".to_string(), "garbage".to_string()),
        ]
        .into_iter()
        .collect();
        let (rows, forget) = fleet(&fields, "abc", now);
        let flags: Vec<(&str, bool, bool)> =
            rows.iter().map(|row| (row.beat.name.as_str(), row.drift, row.silent)).collect();
        assert_eq!(flags, [("a", false, false), ("b", true, false), ("c", false, true)]);
        assert_eq!(forget, ["d", "e"]);
    }

    #[test]
    fn pending_changes_keep_the_newest_per_member() {
        let shared = SharedAdmin::default();
        shared.queue("a", Admin::Draining);
        shared.queue("b", Admin::Maintenance);
        shared.queue("a", Admin::Ready);
        let taken = shared.take_pending();
        assert_eq!(taken, [("b".to_string(), Admin::Maintenance), ("a".to_string(), Admin::Ready)]);
        // A newer change made while the write failed wins over the requeued one.
        shared.queue("a", Admin::Draining);
        shared.requeue(taken);
        assert_eq!(shared.take_pending(), [("b".to_string(), Admin::Maintenance), ("a".to_string(), Admin::Draining)]);
        assert!(!shared.has_pending());
    }
}
