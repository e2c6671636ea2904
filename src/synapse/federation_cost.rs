//! What a federation request costs Synapse, in turns of a small `/send`.
//!
//! The fair share of `federation.per_origin` counts an origin's requests at
//! Synapse by these weights, so a server asking for history or state takes
//! the room of several transactions. Each weight says where it comes from
//! in Synapse 1.163 (`synapse/federation/federation_server.py`,
//! `synapse/handlers/federation.py`); the endpoint is the path's segment
//! after `/_matrix/federation/v1/` or `/v2/`. Anything not listed costs 1.

/// A kind of federation request the table weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// The name `federation.per_origin.weights` uses.
    pub name: &'static str,
    /// The path segment after the version.
    pub endpoint: &'static str,
    pub weight: u32,
    pub source: &'static str,
}

/// The weighed endpoints. `send` is the unit; `media` and `other` close the list.
pub const COSTS: [Cost; 10] = [
    Cost {
        name: "send",
        endpoint: "send",
        weight: 1,
        source: "on_incoming_transaction: at most 50 PDUs and 100 EDUs, the unit every other weight is read against",
    },
    Cost {
        name: "backfill",
        endpoint: "backfill",
        weight: 4,
        source: "on_backfill_request: up to 100 events (handlers/federation.py caps `limit` at 100) walked back through the DAG, each with its signatures",
    },
    Cost {
        name: "get_missing_events",
        endpoint: "get_missing_events",
        weight: 4,
        source: "on_get_missing_events: a breadth-first walk of prev_events, up to 20 events (limit capped at 20)",
    },
    Cost {
        name: "state",
        endpoint: "state",
        weight: 8,
        source: "on_room_state_request: the whole room state and its auth chain at an event, as full events (ResponseCache'd per room and event)",
    },
    Cost {
        name: "state_ids",
        endpoint: "state_ids",
        weight: 4,
        source: "on_state_ids_request: the same state and auth chain computed, answered as event IDs",
    },
    Cost {
        name: "event_auth",
        endpoint: "event_auth",
        weight: 4,
        source: "on_event_auth: an event's whole auth chain, as full events",
    },
    Cost {
        name: "make_join",
        endpoint: "make_join",
        weight: 2,
        source: "on_make_join_request: an event template built against the current state",
    },
    Cost {
        name: "send_join",
        endpoint: "send_join",
        weight: 8,
        source: "on_send_join_request: the join persisted, then the room's state and auth chain returned as /state does (partial state when asked)",
    },
    Cost {
        name: "media",
        endpoint: "media",
        weight: 2,
        source: "federation media download and thumbnail: a file read and streamed, or a thumbnail generated",
    },
    Cost { name: "other", endpoint: "", weight: 1, source: "every other federation endpoint: a lookup or a single event" },
];

/// Weights by the table's order, overridable by name from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weights([u32; COSTS.len()]);

impl Default for Weights {
    fn default() -> Weights {
        Weights(COSTS.map(|cost| cost.weight))
    }
}

impl Weights {
    /// Sets the weight of the kind called `name`; false when there is none.
    pub fn set(&mut self, name: &str, weight: u32) -> bool {
        match COSTS.iter().position(|cost| cost.name == name) {
            Some(at) => {
                self.0[at] = weight;
                true
            }
            None => false,
        }
    }

    /// The weight of a request with this path (at least 1).
    pub fn of(&self, path: &[u8]) -> u32 {
        self.0[kind(path)].max(1)
    }

    pub fn largest(&self) -> u32 {
        self.0.iter().copied().max().unwrap_or(1).max(1)
    }
}

/// Where in [`COSTS`] a federation path falls.
pub fn kind(path: &[u8]) -> usize {
    let other = COSTS.len() - 1;
    let Some(rest) = path.strip_prefix(b"/_matrix/federation/") else { return other };
    let Some(rest) = rest.strip_prefix(b"v1/").or_else(|| rest.strip_prefix(b"v2/")) else { return other };
    let endpoint = rest.split(|&b| b == b'/').next().unwrap_or_default();
    COSTS[..other].iter().position(|cost| cost.endpoint.as_bytes() == endpoint).unwrap_or(other)
}

/// The names the config may weigh, for its error messages.
pub fn names() -> Vec<&'static str> {
    COSTS.iter().map(|cost| cost.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_fall_in_their_kind() {
        let weights = Weights::default();
        let cases: [(&str, u32); 12] = [
            ("/_matrix/federation/v1/send/1234", 1),
            ("/_matrix/federation/v1/backfill/!room:a?v=%24e&limit=100", 4),
            ("/_matrix/federation/v1/get_missing_events/!room:a", 4),
            ("/_matrix/federation/v1/state/!room:a", 8),
            ("/_matrix/federation/v1/state_ids/!room:a", 4),
            ("/_matrix/federation/v1/event_auth/!room:a/$e", 4),
            ("/_matrix/federation/v1/make_join/!room:a/@u:b", 2),
            ("/_matrix/federation/v2/send_join/!room:a/$e", 8),
            ("/_matrix/federation/v1/media/download/abc", 2),
            ("/_matrix/federation/v1/query/profile", 1),
            ("/_matrix/federation/v1/statex/!room:a", 1),
            ("/_matrix/key/v2/server", 1),
        ];
        for (path, weight) in cases {
            let path = path.split('?').next().unwrap_or_default();
            assert_eq!(weights.of(path.as_bytes()), weight, "{path}");
        }
    }

    #[test]
    fn weights_are_set_by_name_and_never_below_one() {
        let mut weights = Weights::default();
        assert!(weights.set("backfill", 10));
        assert!(weights.set("send", 0));
        assert!(!weights.set("nonsense", 3));
        assert_eq!(weights.of(b"/_matrix/federation/v1/backfill/!r:a"), 10);
        assert_eq!(weights.of(b"/_matrix/federation/v1/send/1"), 1);
        assert_eq!(weights.largest(), 10);
        assert_eq!(names().len(), COSTS.len());
    }
}
