//! Per-request metric handles, resolved once per snapshot instead of by
//! label lookup on every request: a `MetricVec` lookup hashes the labels and
//! takes the vector's lock, which every request thread would share.
//!
//! Each series is still created on first use (a group nobody calls shows no
//! empty histogram), then read through a `OnceCell` without a lock.

use super::metrics::METRICS;
use crate::synapse::table::Group;
use once_cell::sync::OnceCell;
use prometheus::{Histogram, IntCounter};

/// Method classes, in the order of `method_index`.
pub const METHOD_CLASSES: [&str; 4] = ["read", "options", "write", "other"];

/// Status labels with bounded cardinality: common codes by number, the rest
/// by class. `status_index` maps a status here.
pub const STATUS_LABELS: [&str; 26] = [
    "none", "101", "200", "204", "206", "301", "302", "304", "400", "401", "403", "404", "405", "409", "413", "429",
    "500", "502", "503", "504", "1xx", "2xx", "3xx", "4xx", "5xx", "other",
];

/// GET, HEAD: read; OPTIONS: options; other standard methods: write.
fn method_index(method: &http::Method) -> usize {
    match *method {
        http::Method::GET | http::Method::HEAD => 0,
        http::Method::OPTIONS => 1,
        http::Method::POST | http::Method::PUT | http::Method::DELETE | http::Method::PATCH => 2,
        _ => 3,
    }
}

/// Where a status sits in `STATUS_LABELS`.
fn status_index(status: u16) -> usize {
    match status {
        0 => 0,
        101 => 1,
        200 => 2,
        204 => 3,
        206 => 4,
        301 => 5,
        302 => 6,
        304 => 7,
        400 => 8,
        401 => 9,
        403 => 10,
        404 => 11,
        405 => 12,
        409 => 13,
        413 => 14,
        429 => 15,
        500 => 16,
        502 => 17,
        503 => 18,
        504 => 19,
        // The rest by class.
        _ => match status / 100 {
            1 => 20,
            2 => 21,
            3 => 22,
            4 => 23,
            5 => 24,
            _ => 25,
        },
    }
}

const SLOTS: usize = METHOD_CLASSES.len() * STATUS_LABELS.len();

/// `requests_total` for one (group, worker) pair, a handle per method class
/// and status.
pub struct WorkerCounters {
    group: String,
    worker: String,
    /// Allocated on the first request, so pairs never used cost a pointer.
    slots: OnceCell<Box<[OnceCell<IntCounter>]>>,
}

impl WorkerCounters {
    fn new(group: &str, worker: &str) -> WorkerCounters {
        WorkerCounters { group: group.to_string(), worker: worker.to_string(), slots: OnceCell::new() }
    }

    pub fn worker(&self) -> &str {
        &self.worker
    }

    pub fn count(&self, method: &http::Method, status: u16) {
        let (method, status) = (method_index(method), status_index(status));
        let slots = self.slots.get_or_init(|| (0..SLOTS).map(|_| OnceCell::new()).collect());
        if let Some(slot) = slots.get(method * STATUS_LABELS.len() + status) {
            slot.get_or_init(|| {
                METRICS.traffic.requests.with_label_values(&[
                    self.group.as_str(),
                    self.worker.as_str(),
                    METHOD_CLASSES[method],
                    STATUS_LABELS[status],
                ])
            })
            .inc();
        }
    }
}

/// The handles of one route group (a Synapse group, a named upstream, or
/// the edge's own answers).
pub struct GroupMetrics {
    name: String,
    latency: OnceCell<Histogram>,
    upstream_latency: OnceCell<Histogram>,
    /// In the order of the pool's members.
    members: Vec<WorkerCounters>,
    /// Requests no member served: the main process for a Synapse group,
    /// the edge itself otherwise.
    no_member: WorkerCounters,
    /// A member index the pool does not have (`-` for Synapse groups).
    unknown_member: WorkerCounters,
}

impl GroupMetrics {
    fn new(name: &str, members: &[&str], no_member: &str, unknown_member: &str) -> GroupMetrics {
        let members = members.iter().map(|member| WorkerCounters::new(name, member)).collect();
        GroupMetrics {
            name: name.to_string(),
            latency: OnceCell::new(),
            upstream_latency: OnceCell::new(),
            members,
            no_member: WorkerCounters::new(name, no_member),
            unknown_member: WorkerCounters::new(name, unknown_member),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pair for a request served by `member`, or by no member.
    pub fn worker(&self, member: Option<usize>) -> &WorkerCounters {
        match member {
            Some(index) => self.members.get(index).unwrap_or(&self.unknown_member),
            None => &self.no_member,
        }
    }

    pub fn observe(&self, total: std::time::Duration, upstream: Option<std::time::Duration>) {
        self.latency
            .get_or_init(|| METRICS.traffic.latency.with_label_values(&[self.name.as_str()]))
            .observe(total.as_secs_f64());
        if let Some(upstream) = upstream {
            self.upstream_latency
                .get_or_init(|| METRICS.traffic.upstream_latency.with_label_values(&[self.name.as_str()]))
                .observe(upstream.as_secs_f64());
        }
    }
}

/// Every group a snapshot can name, built with it.
pub struct RequestMetrics {
    /// In `Group::ALL` order.
    synapse: Vec<GroupMetrics>,
    /// In `UpstreamId` order.
    upstreams: Vec<GroupMetrics>,
    edge: GroupMetrics,
}

impl RequestMetrics {
    /// `members_of`: a Synapse group's member labels in pool order;
    /// `upstreams`: each named upstream's name and member labels. Labels,
    /// not pools: metrics sit below the pools that report to them.
    pub fn new<'a>(
        members_of: impl Fn(Group) -> Vec<&'a str>,
        upstreams: impl Iterator<Item = (&'a str, Vec<&'a str>)>,
    ) -> RequestMetrics {
        RequestMetrics {
            synapse: Group::ALL
                .iter()
                .map(|&group| GroupMetrics::new(group.name(), &members_of(group), "main", "-"))
                .collect(),
            upstreams: upstreams.map(|(name, members)| GroupMetrics::new(name, &members, "edge", "edge")).collect(),
            edge: GroupMetrics::new("edge", &[], "edge", "edge"),
        }
    }

    pub fn synapse(&self, group: Group) -> &GroupMetrics {
        // `Group::ALL` lists the groups in declaration order (tested below).
        self.synapse.get(group as usize).unwrap_or(&self.edge)
    }

    pub fn upstream(&self, index: usize) -> &GroupMetrics {
        self.upstreams.get(index).unwrap_or(&self.edge)
    }

    pub fn edge(&self) -> &GroupMetrics {
        &self.edge
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_index_their_list() {
        for (at, group) in Group::ALL.into_iter().enumerate() {
            assert_eq!(group as usize, at);
        }
    }

    #[test]
    fn statuses_map_to_their_labels() {
        for (status, label) in [
            (0, "none"),
            (200, "200"),
            (429, "429"),
            (103, "1xx"),
            (207, "2xx"),
            (308, "3xx"),
            (418, "4xx"),
            (599, "5xx"),
            (600, "other"),
            (99, "other"),
        ] {
            assert_eq!(STATUS_LABELS[status_index(status)], label, "{status}");
        }
        for status in 0..1000 {
            assert!(status_index(status) < STATUS_LABELS.len());
        }
    }

    #[test]
    fn a_pair_counts_under_its_labels() {
        let metrics = RequestMetrics::new(|_| Vec::new(), std::iter::empty());
        let typing = metrics.synapse(Group::Typing);
        typing.worker(None).count(&http::Method::PUT, 200);
        typing.worker(Some(3)).count(&http::Method::GET, 404);
        let text = String::from_utf8(super::super::metrics::render()).unwrap();
        assert!(
            text.contains(&format!(
                r#"requests_total{{group="{}",method="write",status="200",worker="main"}} 1"#,
                Group::Typing
            )),
            "{text}"
        );
        let not_found =
            format!(r#"requests_total{{group="{}",method="read",status="404",worker="-"}} 1"#, Group::Typing);
        assert!(text.contains(&not_found), "{text}");
    }
}
